"""``lamabus``: the command line (DESIGN.md "Running").

    lamabus serve [--nats-url URL] [--data-dir DIR] [--prefix lama] [--config FILE]
                  [--registry sqlite|nats] [--node-id ID] [--replicas N]
                  [--openai HOST:PORT]
    lamabus gateway [--openai HOST:PORT] [--nats-url URL]   (the OpenAI-compatible API alone)
    lamabus chat <topic> [--once TEXT]

Flags win over the environment (LAMABUS_*), which wins over the TOML file,
which wins over the defaults in bus/config.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

import anyio

from bus.config import Settings, load_settings
from wire.errors import LamaError

Command = Callable[[argparse.Namespace, Settings], Any]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="external NATS server (default: the embedded one; env LAMABUS_NATS_URL)")
    parser.add_argument("--data-dir", help="registry, JetStream store and models (env LAMABUS_DATA_DIR)")
    parser.add_argument("--prefix", help="subject prefix (default lama; env LAMABUS_PREFIX)")
    parser.add_argument("--config", help="TOML file with a [lamabus] table (env LAMABUS_CONFIG)")
    login = parser.add_argument_group("logging in to the broker (docs/security.md; secrets only from files or "
                                      "LAMABUS_NATS_PASSWORD / LAMABUS_NATS_TOKEN)")
    login.add_argument("--nats-creds", metavar="FILE", help="a NATS .creds file (JWT + nkey seed)")
    login.add_argument("--nats-nkey", metavar="FILE", help="a file holding an nkey seed")
    login.add_argument("--nats-user", metavar="NAME", help="user name (password: --nats-password-file or "
                                                           "LAMABUS_NATS_PASSWORD)")
    login.add_argument("--nats-password-file", metavar="FILE")
    login.add_argument("--nats-token-file", metavar="FILE", help="a file holding the token (or LAMABUS_NATS_TOKEN)")
    login.add_argument("--nats-tls-ca", metavar="FILE", help="the CA that signed the broker's certificate")
    login.add_argument("--nats-tls-cert", metavar="FILE", help="client certificate, for mutual TLS")
    login.add_argument("--nats-tls-key", metavar="FILE", help="the client certificate's key")


def _openai(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--openai", metavar="ADDR", help=help)
    parser.add_argument("--openai-keys-file", metavar="FILE",
                        help="API keys, <role>:<key> per line (env LAMABUS_OPENAI_KEYS_FILE; keys also from "
                             "LAMABUS_OPENAI_KEYS); none: loopback only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamabus", description="Local-LLM chat assistant on NATS")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service")
    _common(serve)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--web", metavar="ADDR",
                       help="serve the chat page on HOST:PORT, or 'off' (default 127.0.0.1:8080; env LAMABUS_WEB)")
    serve.add_argument("--metrics", metavar="ADDR",
                       help="Prometheus: HOST:PORT also serves /metrics; 'bus' (default) only lama.api.metrics; "
                            "'off' (env LAMABUS_METRICS)")
    serve.add_argument("--nats-ws-url", metavar="URL",
                       help="the external broker's NATS WebSocket URL, for the page (env LAMABUS_NATS_WS_URL)")
    serve.add_argument("--registry", choices=["sqlite", "nats"],
                       help="the registry's log: a SQLite file (default, one node) or JetStream on the broker, "
                            "shared by several nodes (env LAMABUS_REGISTRY)")
    serve.add_argument("--node-id", help="this node's name in a cluster (default: host and data dir; "
                                         "env LAMABUS_NODE_ID)")
    serve.add_argument("--replicas", type=int,
                       help="copies of each stream lamabus creates (default min(3, cluster size); env LAMABUS_REPLICAS)")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="the embedded broker without users or permissions: anyone who reaches it can do "
                            "anything (env LAMABUS_INSECURE=1)")
    _openai(serve, "also serve the OpenAI-compatible API on HOST:PORT (default off; env LAMABUS_OPENAI)")
    serve.set_defaults(run=_serve)

    gateway = sub.add_parser("gateway", help="the OpenAI-compatible HTTP API alone, in front of lamabus on the bus")
    _common(gateway)
    gateway.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _openai(gateway, "listen on HOST:PORT (default 127.0.0.1:8000; port 0: a free one; env LAMABUS_OPENAI)")
    gateway.set_defaults(run=_gateway)

    chat = sub.add_parser("chat", help="chat in a topic from the terminal")
    _common(chat)
    chat.add_argument("topic")
    chat.add_argument("--once", metavar="TEXT", help="send one message, print the streamed reply, exit")
    chat.add_argument("--author", default=os.environ.get("USER", "user"), help="your author id")
    chat.add_argument("--model", help="ask this model instead of the topic's")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--timeout", type=float, default=300.0)
    chat.set_defaults(run=_chat)

    # The admin and replay commands live beside, to keep this file small.
    from bus.cli import registry as cli_registry
    from bus.replay import command as replay

    cli_registry.register(sub, _common)
    replay.register(sub, _common)
    return parser


_LOGIN_FLAGS = ("nats_creds", "nats_nkey", "nats_user", "nats_password_file", "nats_token_file", "nats_tls_ca",
                "nats_tls_cert", "nats_tls_key")


def _settings(args: argparse.Namespace) -> Settings:
    flags = {k: getattr(args, k, None) for k in ("nats_url", "data_dir", "prefix", "log_level", "web", "nats_ws_url",
                                                   "metrics", "registry", "node_id", "replicas", "insecure",
                                                   "openai", "openai_keys_file", *_LOGIN_FLAGS)}
    return load_settings(flags, config_file=getattr(args, "config", None))


#: ``serve``'s exit status when its NATS client went deaf (sysexits' EX_TEMPFAIL: start me again).
EXIT_CLIENT_DEAF = 75


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from bus.node.app import ClientDeaf, serve_forever

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    deaf = False
    failed: BaseException | None = None
    try:
        anyio.run(serve_forever, settings)
    except* ClientDeaf:
        # Already logged where it was noticed; a supervisor (docker's restart policy, systemd) starts us again.
        deaf = True
    except* LamaError as group:
        # A refused login, a bad setting: one line from main(), not a task group's traceback.
        failed = group.exceptions[0]
        while isinstance(failed, BaseExceptionGroup):
            failed = failed.exceptions[0]
    if failed is not None:
        raise failed
    return EXIT_CLIENT_DEAF if deaf else 0


def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    from bus.auth.embedded import client_login
    from bus.gateway.server import run_gateway

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The configured broker and login, else a local serve's embedded broker as its admin (the gateway acts for
    # its own callers, whose keys it checks: bus/gateway/auth.py).
    url, credentials = client_login(settings)
    anyio.run(run_gateway, settings, url, credentials)
    return 0


def _chat(args: argparse.Namespace, settings: Settings) -> int:
    from bus.cli.chat import run_chat

    return anyio.run(run_chat, args, settings)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        return int(args.run(args, settings) or 0)
    except LamaError as exc:
        print(f"error [{exc.code.value}]: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
