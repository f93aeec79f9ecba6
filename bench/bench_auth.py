"""What logging in costs the token loop: one stream's bus tok/s with TLS + credentials ÷ without (issue 20).

    .venv/bin/python -m bench.bench_auth [--reps 6] [--tokens 128] [--json bench/auth.json]

Two nats-servers on loopback: ``plain`` (no users, no TLS: today's open broker) and ``secure`` (TLS
with certificates made here, users with the roles' permissions of bus/auth/roles.py, so every publish
is checked against them). One ``lamabus serve`` on each, the secure one logging in as ``service`` over
``tls://`` with its password from the environment and the CA; the bench's client logs in over TLS too.
Only one generates at a time: every repetition asks each the same greedy question (a fresh nonce per
repetition, no cache hit), the order alternating, and tok/s is the client's decode rate after the first
token as in bench/bench_bus.py. The figure is the median of the per-repetition ratios secure ÷ plain;
target >= 0.98.

On a busy machine that ratio is mostly noise, so the cost the login adds to each token is also measured
in this process, where only the transport moves it: microseconds per token message from a publisher
logged in as ``service`` to a subscriber, both over TLS through the secure broker (permissions checked
on every publish), minus the same through the plain broker (best of 5 rounds of 5,000 messages each),
and the ratio that cost alone bounds at the measured plain rate, ``1 / (1 + cost × tok/s)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from bench.security_rig import make_pki, tls_config  # noqa: E402
from bench.sides import BusSide, ServiceProcess, wait_ready  # noqa: E402
from bench.workload import PREFIX, essay, greedy  # noqa: E402
from bus.auth.roles import permissions  # noqa: E402
from bus.broker.embedded import EmbeddedNatsServer  # noqa: E402

TARGET = 0.98
SERVICE_PASSWORD = "bench-service-" + uuid.uuid4().hex
OBSERVER_PASSWORD = "bench-observer-" + uuid.uuid4().hex


def _secure_config(pki: Any) -> str:
    # The bench's client watches every topic of the prefix (BusSide subscribes <prefix>.topic.*.*) and asks
    # the API: a user of its own with just that, checked like any other.
    observer = {"publish": {"allow": [f"{PREFIX}.topic.*.msg", f"{PREFIX}.api.>"]},
                "subscribe": {"allow": [f"{PREFIX}.topic.*.*", "_INBOX.>"]}}
    users = [{"user": "lamabus-service", "password": SERVICE_PASSWORD,
              "permissions": permissions("service", prefix=PREFIX).server_config()},
             {"user": "bench", "password": OBSERVER_PASSWORD, "permissions": observer}]
    return "authorization {\n  users = " + json.dumps(users) + "\n}\n" + tls_config(pki, verify=False)


def _start(url: str, work: Path, mode: str, env: dict[str, str]) -> ServiceProcess:
    service = ServiceProcess(url, work / mode, work / f"{mode}.log")
    saved = {k: os.environ.get(k) for k in (*env, "LAMABUS_WEB", "LAMABUS_METRICS")}
    os.environ.update(LAMABUS_WEB="off", LAMABUS_METRICS="off", **env)
    try:
        service.start()  # the child takes a copy of this environment
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return service


async def _per_message_us(pub: Any, sub_nc: Any, subject: str, data: bytes, n: int) -> float:
    """Microseconds per message from ``pub`` until ``sub_nc`` has received all ``n`` of them."""
    done = asyncio.Event()
    got = 0

    async def on_msg(_msg: Any) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    sub = await sub_nc.subscribe(subject, cb=on_msg)
    await sub_nc.flush()
    t0 = time.perf_counter()
    for _ in range(n):
        await pub.publish(subject, data)
    await pub.flush()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return elapsed / n * 1e6


async def transport_us_per_token(plain_url: str, secure_url: str, ca: Path, n: int = 5000) -> dict[str, float]:
    """Best-of-5 microseconds per token message, plain and secure (publisher as ``service``, over TLS)."""
    from bus.broker.connection import connect
    from bus.auth.credentials import Credentials
    from wire.messages import GenerationToken, encode

    data = encode(GenerationToken(request_id="r" * 36, topic="bench", author_id="a" * 64, seq=1, text=" token"))
    subject = f"{PREFIX}.topic.bench.tok"
    tls = ssl.create_default_context(cafile=str(ca))
    best: dict[str, float] = {}
    for mode in ("plain", "secure"):
        if mode == "plain":
            pub = await connect(plain_url, name="bench-pub")
            sub_nc = await nats.connect(plain_url, name="bench-sub")
        else:
            pub = await connect(secure_url, name="bench-pub", credentials=Credentials(
                user="lamabus-service", password=SERVICE_PASSWORD, tls_ca=str(ca)))
            sub_nc = await nats.connect(secure_url, name="bench-sub", user="bench", password=OBSERVER_PASSWORD,
                                        tls=tls)
        try:
            best[mode] = min([await _per_message_us(pub, sub_nc, subject, data, n) for _ in range(5)])
        finally:
            await pub.close()
            await sub_nc.close()
    return best


async def run(reps: int = 6, tokens: int = 128, workdir: str | None = None, log: Any = print) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lamabus-bench-auth-", dir=workdir))
    services: dict[str, ServiceProcess] = {}
    transport: dict[str, float] = {}
    pki = make_pki(work / "pki")
    try:
        async with EmbeddedNatsServer(work / "plain-js") as plain, \
                EmbeddedNatsServer(work / "secure-js", config=_secure_config(pki)) as secure:
            assert plain.url and secure.url
            secure_url = f"tls://127.0.0.1:{secure.port}"
            services = {
                "plain": _start(plain.url, work, "plain", {}),
                "secure": _start(secure_url, work, "secure", {
                    "LAMABUS_NATS_USER": "lamabus-service", "LAMABUS_NATS_PASSWORD": SERVICE_PASSWORD,
                    "LAMABUS_NATS_TLS_CA": str(pki.ca)}),
            }
            ncs = {"plain": await nats.connect(plain.url, name="lamabus-bench-auth"),
                   "secure": await nats.connect(secure_url, name="lamabus-bench-auth", user="bench",
                                                password=OBSERVER_PASSWORD,
                                                tls=ssl.create_default_context(cafile=str(pki.ca)))}
            try:
                transport = await transport_us_per_token(plain.url, secure_url, pki.ca)
                log(f"  transport: secure {transport['secure']:.1f} us/token | plain {transport['plain']:.1f} us/token")
                sides = {mode: BusSide(nc) for mode, nc in ncs.items()}
                for mode, side in sides.items():
                    await side.start()
                    await wait_ready(side, services[mode])
                    await side.ask("warmup", "Say hello.", greedy(8))  # loads the model
                tps: dict[str, list[float]] = {"secure": [], "plain": []}
                ratios: list[float] = []
                for rep in range(reps):
                    user = essay(f"a{rep}-{uuid.uuid4().hex[:8]}")
                    got: dict[str, float | None] = {}
                    for mode in (("secure", "plain") if rep % 2 else ("plain", "secure")):
                        r = await sides[mode].ask(f"auth-{rep}", user, greedy(tokens))
                        got[mode] = r.tps(tokens)
                    log(f"  rep {rep}: secure {got['secure'] or 0:.1f} tok/s | plain {got['plain'] or 0:.1f} tok/s")
                    if got["secure"] and got["plain"]:
                        tps["secure"].append(got["secure"])
                        tps["plain"].append(got["plain"])
                        ratios.append(got["secure"] / got["plain"])
            finally:
                for service in services.values():
                    service.stop()
                for nc in ncs.values():
                    await nc.close()
    except BaseException:
        for mode, service in services.items():
            log(f"{mode} service log tail:\n{service.log_tail()}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(ratios) if ratios else None
    plain_tps = statistics.median(tps["plain"]) if tps["plain"] else None
    cost_us = max(0.0, transport["secure"] - transport["plain"])
    return {
        "auth_transport_secure_us_per_token": round(transport["secure"], 2),
        "auth_transport_plain_us_per_token": round(transport["plain"], 2),
        "auth_cost_us_per_token": round(cost_us, 2),
        "auth_cost_bound_ratio": round(1 / (1 + cost_us * 1e-6 * plain_tps), 5) if plain_tps else None,
        "auth_secure_tps": round(statistics.median(tps["secure"]), 1) if tps["secure"] else None,
        "auth_plain_tps": round(statistics.median(tps["plain"]), 1) if tps["plain"] else None,
        "auth_secure_plain_ratio": round(ratio, 3) if ratio is not None else None,
        "auth_ratios": [round(r, 3) for r in ratios],
        "auth_target": TARGET,
        "reps": reps, "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_auth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--workdir")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    results = asyncio.run(run(args.reps, args.tokens, args.workdir, log=lambda s: print(s, flush=True)))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
