"""A real nats-server cluster for tests and benches: N processes with JetStream, routes on loopback.

    async with NatsCluster(tmp_path / "cluster") as cluster:
        nc = await nats.connect(servers=cluster.urls_from(1))   # server 1 first, the others to fail over to
        await cluster.kill(2)                                    # SIGKILL, no goodbye
        await cluster.restart(2)                                 # same name, ports and JetStream dir

Each server has its own JetStream store directory and log file under the base
directory. The context manager returns once the JetStream meta leader is
elected and every server is a JetStream peer (an R``size`` stream can be
created), so a test can create replicated streams at once. Every wait is
bounded by ``startup_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import nats
import nats.errors

from bus.broker.embedded import nats_server_binary, terminate

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """Ports free right now; held open together so the n differ. A server that loses the race fails to start
    and says so."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ClusterNode:
    index: int
    name: str
    port: int
    cluster_port: int
    directory: Path
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.directory / "jetstream"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class NatsCluster:
    def __init__(self, base_dir: str | os.PathLike[str], *, size: int = 3, name: str = "lama-test",
                 startup_timeout: float = 60.0, config: str = "", connect_options: dict | None = None,
                 scheme: str = "nats") -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        #: More config for every server (users and permissions, a ``tls`` block: tests/test_security_cluster.py),
        #: the nats-py options the readiness probe logs in with, and the clients' URL scheme (``tls`` for TLS).
        self.config = config
        self.connect_options = connect_options or {}
        self.scheme = scheme
        self.base_dir = Path(base_dir)
        self.name = name
        self.startup_timeout = startup_timeout
        ports = free_ports(2 * size)
        self.nodes = [
            ClusterNode(i, f"n{i}", ports[2 * (i - 1)], ports[2 * (i - 1) + 1], self.base_dir / f"n{i}")
            for i in range(1, size + 1)
        ]

    # -- addressing (servers are numbered from 1)

    def node(self, i: int) -> ClusterNode:
        return self.nodes[i - 1]

    @property
    def urls(self) -> list[str]:
        return [n.url.replace("nats://", f"{self.scheme}://", 1) for n in self.nodes]

    def urls_from(self, i: int) -> list[str]:
        """Every server's URL, server ``i`` first: connect there, fail over to the rest in order."""
        return self.urls[i - 1:] + self.urls[:i - 1]

    # -- processes

    def _config(self, node: ClusterNode) -> Path:
        routes = ", ".join(f'"nats-route://{HOST}:{n.cluster_port}"' for n in self.nodes if n is not node)
        path = node.directory / "server.conf"
        path.write_text(
            f'server_name: "{node.name}"\n'
            f'listen: "{HOST}:{node.port}"\n'
            f"jetstream {{ store_dir: {json.dumps(str(node.store_dir))} }}\n"
            f"cluster {{\n"
            f'  name: "{self.name}"\n'
            f'  listen: "{HOST}:{node.cluster_port}"\n'
            f"  routes: [{routes}]\n"
            f"}}\n"
            + self.config
        )
        return path

    async def _spawn(self, node: ClusterNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        config = self._config(node)
        with open(node.log_path, "ab") as log:
            # Its own session so a test's Ctrl-C is not delivered twice; the log file, not a pipe,
            # so a chatty server never blocks on a reader that is not there.
            node.proc = await asyncio.create_subprocess_exec(
                nats_server_binary(), "-c", str(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )

    async def _wait_listening(self, node: ClusterNode, deadline: float) -> None:
        while True:
            if node.proc is None or node.proc.returncode is not None:
                raise RuntimeError(f"nats-server {node.name} exited on start:\n{self._log_tail(node)}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, node.port)
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                        if (await reader.readline()).startswith(b"INFO"):
                            return
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nats-server {node.name} is not listening on {node.url}:\n{self._log_tail(node)}")
            await asyncio.sleep(0.05)  # a retry pause while the process starts, not a stand-in for a condition

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until every running server listens, a JetStream meta leader answers, and a stream replicated on
        every running server can be created (each is a JetStream peer)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        running = [n for n in self.nodes if n.running]
        for node in running:
            await self._wait_listening(node, deadline)
        nc = await nats.connect(servers=[self.urls[n.index - 1] for n in running], connect_timeout=2,
                                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                                **self.connect_options)
        try:
            probe = f"CLUSTER_PROBE_{uuid.uuid4().hex[:8]}"
            config = {"name": probe, "subjects": [f"cluster.probe.{probe}"], "storage": "memory",
                      "num_replicas": len(running)}
            last_error = "no answer"
            while True:
                with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    info = json.loads((await nc.request("$JS.API.INFO", b"", timeout=1)).data)
                    last_error = json.dumps(info.get("error"))
                    if info.get("error") is None:
                        created = json.loads((await nc.request(f"$JS.API.STREAM.CREATE.{probe}",
                                                               json.dumps(config).encode(), timeout=2)).data)
                        last_error = json.dumps(created.get("error"))
                        if created.get("error") is None:
                            await nc.request(f"$JS.API.STREAM.DELETE.{probe}", b"", timeout=2)
                            return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"JetStream cluster not ready: {last_error}")
                await asyncio.sleep(0.1)  # the meta leader election is still running; ask again
        finally:
            await nc.close()

    async def start(self) -> "NatsCluster":
        try:
            for node in self.nodes:
                await self._spawn(node)
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def kill(self, i: int) -> None:
        """SIGKILL server ``i`` and wait for it to be gone: no flush, no leadership hand-over."""
        node = self.node(i)
        if node.proc is not None and node.proc.returncode is None:
            node.proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(self.startup_timeout):
                await node.proc.wait()

    async def restart(self, i: int) -> None:
        """Start a stopped server again with its name, ports and store, and wait until the cluster is ready."""
        node = self.node(i)
        if node.running:
            return
        await self._spawn(node)
        await self.wait_ready()

    async def stop(self) -> None:
        for node in self.nodes:
            proc, node.proc = node.proc, None
            if proc is not None:
                await terminate(proc)

    def _log_tail(self, node: ClusterNode, lines: int = 15) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def __aenter__(self) -> "NatsCluster":
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
