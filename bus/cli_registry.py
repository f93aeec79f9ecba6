"""Admin commands: models, catalogue, topics (over the running service's API) and the registry log.

    lamabus models list|show|import|pull|update|activate|rm|load|unload
    lamabus catalog
    lamabus topics create|show|list|bind|prompt
    lamabus registry events [--from N] [--follow]
    lamabus registry rebuild
    lamabus diagnostics

Every command prints a table for people, or with ``--json`` the API's reply
as JSON (camelCase) for scripts. ``models``/``catalog``/``topics`` talk to a
running service over ``<prefix>.api.*`` (``Settings.client_url`` finds it). ``registry
events``/``registry rebuild`` read the SQLite registry file under the data
directory directly, so they work with the service stopped; ``rebuild``
compares what it rebuilt with the running service's incrementally kept state
when one answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any, Callable

import anyio
import msgspec

from bus.config import Settings
from wire.api import ApiRequest, DiagnosticsGet, MetricsGet, endpoint_for
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError

Runner = Callable[[argparse.Namespace, Settings], int]


# ---------------------------------------------------------------------------------------- output


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(console.width, 160)  # piped: long lines grep better than folded cells
    return console


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def _ms(at: int) -> str:
    return datetime.fromtimestamp(at / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if at else "-"


def _table(title: str | None, columns: list[str], rows: list[list[Any]], *, no_wrap: tuple[int, ...] = (0,)) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, no_wrap=i in no_wrap, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    _console().print(table)


def _fields_table(title: str, value: msgspec.Struct) -> None:
    """Every non-null field of a record, one per row, under its wire (camelCase) name."""
    data = msgspec.to_builtins(value)
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list, tuple)) else v] for k, v in data.items() if v is not None]
    _table(title, ["field", "value"], rows)


# ---------------------------------------------------------------------------------------- talking to the service


async def _call(settings: Settings, request: ApiRequest[Any], *, timeout: float,
                progress: tuple[str, Callable[[str], ApiRequest[Any]]] | None = None, show_progress: bool = True) -> Any:
    """Call the endpoint of ``request``; ``progress``: (description, the request made for a progress subject)."""
    import nats.errors

    from bus.client import LamabusClient

    url = settings.client_url()
    subject = endpoint_for(request).subject(f"{settings.prefix}.api")
    async with LamabusClient.connect(url, prefix=settings.prefix) as client:
        try:
            if progress is None:
                return await client.call(request, timeout=timeout)
            description, make_request = progress
            return await _with_progress(client, description, make_request, timeout, show_progress)
        except nats.errors.NoRespondersError:
            raise LamaError(ErrorCode.TIMEOUT, f"no lamabus service answers {subject} at {url}: is `lamabus serve` "
                            "running (with the same --prefix)?", url=url) from None
        except nats.errors.TimeoutError:
            raise LamaError(ErrorCode.TIMEOUT, f"{subject} did not answer within {timeout:g} s (--timeout)",
                            url=url) from None


async def _with_progress(client: Any, description: str, make_request: Callable[[str], ApiRequest[Any]],
                         timeout: float, show: bool) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from wire.api import Progress as ProgressEvent

    decoder = msgspec.json.Decoder(ProgressEvent)
    subject = client.nc.new_inbox()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=_console(stderr=True), disable=not show) as bar:
        task = bar.add_task(description, total=None)

        async def on_progress(msg: Any) -> None:
            try:
                event = decode_untrusted(decoder, msg.data)
            except LamaError:
                return
            bar.update(task, completed=event.done, total=event.total)

        sub = await client.nc.subscribe(subject, cb=on_progress)
        try:
            await client.nc.flush()  # the subscription is live before the service can publish to it
            reply = await client.call(make_request(subject), timeout=timeout)
            await client.nc.flush()  # progress sent before the reply is handled before the bar closes
            return reply
        finally:
            await sub.unsubscribe()


def _api(make: Callable[[argparse.Namespace], ApiRequest[Any]], render: Callable[[Any], None], *,
         timeout: float = 30.0, progress: Callable[[argparse.Namespace], str] | None = None) -> Runner:
    """A command that sends one request and prints the reply (``render`` for people, JSON with ``--json``).
    Which endpoint, and what comes back, is the request type's row in wire.api's table."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        wait = args.timeout if args.timeout is not None else timeout
        if progress is None:
            reply = anyio.run(lambda: _call(settings, make(args), timeout=wait))
        else:
            def with_subject(subject: str) -> ApiRequest[Any]:
                return make(argparse.Namespace(**vars(args), progress_subject=subject))

            reply = anyio.run(lambda: _call(settings, with_subject("-"), timeout=wait,
                                            progress=(progress(args), with_subject), show_progress=not args.json))
        if args.json:
            _print_json(reply)
        else:
            render(reply)
        return 0

    return run


# ---------------------------------------------------------------------------------------- models


def _models_table(models: list[Any], loaded: list[str], title: str | None = None) -> None:
    rows = []
    for m in models:
        state = "removed" if m.deleted else ("active" if m.active else "")
        rows.append([m.id, m.name, state, "yes" if m.id in loaded else "", m.architecture, m.quantization,
                     _size(m.size), m.usage_count, m.provider])
    _table(title, ["ID", "NAME", "STATE", "LOADED", "ARCH", "QUANT", "SIZE", "USES", "PROVIDER"], rows,
           no_wrap=(0, 2, 3, 4, 5, 6))


def _render_model_list(reply: Any) -> None:
    if not reply.models:
        _console().print("no models: pull one (`lamabus catalog`, `lamabus models pull ID`) or import a GGUF file")
        return
    _models_table(reply.models, reply.loaded)


def _render_model(reply: Any) -> None:
    _fields_table(f"model {reply.model.id}", reply.model)


def _gen_params(args: argparse.Namespace) -> Any:
    from wire.params import GenerationParams

    params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, stop=args.stop, seed=args.seed)
    return params if any(getattr(params, f) is not None for f in params.__struct_fields__) else None


def _load_params(args: argparse.Namespace) -> Any:
    from wire.params import ModelParams

    params = ModelParams(context_size=args.context_size, batch_size=args.batch_size, gpu_layers=args.gpu_layers,
                         threads=args.threads, parallel=args.parallel, flash_attention=args.flash_attention)
    return params if any(getattr(params, f) is not None for f in params.__struct_fields__) else None


def _param_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation parameters (stored on the model; a message's params override them)")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="a stop sequence (repeat for more)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("load parameters (apply at the next load)")
    g.add_argument("--context-size", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--gpu-layers", type=int)
    g.add_argument("--threads", type=int)
    g.add_argument("--parallel", type=int, help="conversations decoded together (sequences)")
    g.add_argument("--flash-attention", choices=("auto", "on", "off"),
                   help="llama.cpp flash attention (off: faster follow-up turns in long conversations on CPU)")


def _update_request(args: argparse.Namespace) -> Any:
    from msgspec import UNSET

    from wire.api import ModelUpdate

    prompt: Any = UNSET
    if args.clear_system_prompt:
        prompt = None
    elif args.system_prompt is not None:
        prompt = args.system_prompt
    return ModelUpdate(model_id=args.model_id, generation=_gen_params(args), load=_load_params(args),
                       reset=args.reset, expected_version=args.expected_version, system_prompt=prompt)


def _render_load(reply: Any) -> None:
    _console().print(f"{reply.model_id} is loaded (loaded now: {', '.join(reply.loaded) or 'none'})")


def _render_unload(reply: Any) -> None:
    what = "unloaded" if reply.was_loaded else "was not loaded"
    _console().print(f"{reply.model_id} {what} (loaded now: {', '.join(reply.loaded) or 'none'})")


# ---------------------------------------------------------------------------------------- catalogue / topics


def _render_catalog(reply: Any) -> None:
    registered = set(reply.registered)
    rows = [[e.id, e.name, e.approx_size, e.architecture, e.quantization, e.context_length, e.source,
             "yes" if e.id in registered else ""] for e in reply.models]
    _table(None, ["ID", "NAME", "SIZE", "ARCH", "QUANT", "CONTEXT", "SOURCE", "REGISTERED"], rows)


def _topic_row(t: Any) -> list[Any]:
    model = t.bound_model_id or (f"{t.model_id} (active)" if t.model_id else "none (no active model)")
    return [t.id, t.name, model, t.message_count, t.reply_count, _ms(t.created)]


def _render_topics(reply: Any) -> None:
    if not reply.topics:
        _console().print("no topics yet")
        return
    _table(None, ["ID", "NAME", "ANSWERED BY", "MESSAGES", "REPLIES", "CREATED"], [_topic_row(t) for t in reply.topics])


def _render_topic(reply: Any) -> None:
    _fields_table(f"topic {reply.topic.id}", reply.topic)


# ---------------------------------------------------------------------------------------- registry (the SQLite file)


@contextlib.asynccontextmanager
async def _open_store(settings: Settings, poll_interval: float = 1.0) -> Any:
    from storage.sqlite import SqliteEventStore

    path = settings.registry_path
    if not path.exists():
        raise LamaError(ErrorCode.NOT_FOUND, f"no registry at {path} (--data-dir / LAMABUS_DATA_DIR?)", path=str(path))
    store = SqliteEventStore(path, poll_interval=poll_interval)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _event_json(stored: Any) -> dict[str, Any]:
    event = msgspec.to_builtins(stored.event)
    return {"position": stored.position, "streamId": stored.stream_id, "version": stored.version,
            "eventId": stored.event_id, "recordedAt": stored.recorded_at, "type": event.pop("type", stored.type),
            "event": event}


def _event_summary(event: dict[str, Any], width: int = 100) -> str:
    parts = []
    for k, v in event.items():
        if k == "at":
            continue
        text = json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else str(v)
        parts.append(f"{k}={text}")
    summary = " ".join(parts)
    return summary if len(summary) <= width else summary[: width - 1] + "…"


def _event_line(e: dict[str, Any]) -> str:
    return (f"#{e['position']:<6} {_ms(e['recordedAt'])}  {e['streamId']} v{e['version']}  {e['type']}  "
            f"{_event_summary(e['event'])}")


async def _events(args: argparse.Namespace, settings: Settings) -> int:
    after = max(0, args.from_position - 1)
    async with _open_store(settings, poll_interval=args.poll) as store:
        if args.follow:
            async for stored in store.follow(after):
                e = _event_json(stored)
                sys.stdout.write((json.dumps(e, sort_keys=True) if args.json else _event_line(e)) + "\n")
                sys.stdout.flush()
            return 0
        events = [_event_json(s) for s in await store.read_all(after, args.limit)]
    if args.json:
        for e in events:
            sys.stdout.write(json.dumps(e, sort_keys=True) + "\n")
        sys.stdout.flush()
        return 0
    if not events:
        _console().print(f"no events after position {after}")
        return 0
    _table(None, ["POS", "RECORDED", "STREAM", "VER", "TYPE", "DETAILS"],
           [[e["position"], _ms(e["recordedAt"]), e["streamId"], e["version"], e["type"], _event_summary(e["event"])]
            for e in events], no_wrap=(0, 1, 2, 4))
    return 0


def _run_events(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return anyio.run(_events, args, settings)
    except BrokenPipeError:  # `lamabus registry events | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
        return 0


class _Snapshot(msgspec.Struct, frozen=True, rename="camel"):
    """What ``registry rebuild`` compares: counts, position, and every model and topic record."""

    position: int
    events: int
    models: int
    live_models: int
    topics: int
    active_model_id: str | None
    model_records: list[Any]
    topic_records: list[Any]

    def summary(self) -> dict[str, Any]:
        return {"position": self.position, "events": self.events, "models": self.models,
                "liveModels": self.live_models, "topics": self.topics, "activeModelId": self.active_model_id}


async def _service_snapshot(settings: Settings, timeout: float) -> _Snapshot | None:
    """The running service's incrementally kept state at one position, or None if no service answers."""
    from bus.client import LamabusClient
    from wire.api import DiagnosticsGet, ModelsList, TopicList

    try:
        async with LamabusClient.connect(settings.client_url(), prefix=settings.prefix) as client:
            for _attempt in range(5):
                before = (await client.call(DiagnosticsGet(), timeout=timeout)).registry
                models = await client.call(ModelsList(include_deleted=True), timeout=timeout)
                topics = await client.call(TopicList(), timeout=timeout)
                after = (await client.call(DiagnosticsGet(), timeout=timeout)).registry
                if before.position == after.position:  # nothing was appended while we asked
                    return _Snapshot(
                        position=after.position, events=after.events, models=after.models,
                        live_models=after.live_models, topics=after.topics,
                        active_model_id=after.active_model_id,
                        model_records=sorted(models.models, key=lambda m: m.id),
                        topic_records=sorted(topics.topics, key=lambda t: t.id))
            raise LamaError(ErrorCode.BUSY, "the registry kept changing while it was read; try again")
    except LamaError as exc:
        if exc.code is ErrorCode.TIMEOUT:
            return None
        raise
    except Exception as exc:  # no responders, a timeout: no service to compare with
        import nats.errors

        if isinstance(exc, nats.errors.Error):
            return None
        raise


async def _rebuilt_snapshot(settings: Settings, up_to: int | None) -> tuple[_Snapshot, float]:
    from handlers.registry import Registry
    from storage.projections import Projections

    async with _open_store(settings) as store:
        started = time.perf_counter()
        view = Projections()
        async for stored in store.iter_all(0):
            if up_to is not None and stored.position > up_to:
                break
            view.apply(stored)
        seconds = time.perf_counter() - started
        registry = Registry(store)
        registry.view = view  # topic_info reads the active model from this view
        return _Snapshot(
            position=view.position, events=view.event_count, models=len(view.models),
            live_models=len(view.live_models()), topics=len(view.topics), active_model_id=view.active_model_id,
            model_records=sorted(view.models.values(), key=lambda m: m.id),
            topic_records=sorted((registry.topic_info(r) for r in view.topics.values()), key=lambda t: t.id),
        ), seconds


def _differences(rebuilt: _Snapshot, service: _Snapshot) -> list[str]:
    diffs = [f"{k}: rebuilt {v!r}, service {service.summary()[k]!r}"
             for k, v in rebuilt.summary().items() if service.summary()[k] != v]
    for kind, mine, theirs in (("model", rebuilt.model_records, service.model_records),
                               ("topic", rebuilt.topic_records, service.topic_records)):
        a, b = {r.id: r for r in mine}, {r.id: r for r in theirs}
        for rid in sorted(a.keys() | b.keys()):
            if rid not in b:
                diffs.append(f"{kind} {rid}: only in the rebuilt state")
            elif rid not in a:
                diffs.append(f"{kind} {rid}: only in the service's state")
            elif a[rid] != b[rid]:
                fields = [f for f in a[rid].__struct_fields__ if getattr(a[rid], f) != getattr(b[rid], f)]
                diffs.append(f"{kind} {rid}: differs in {', '.join(fields)}")
    return diffs


async def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    service = None if args.offline else await _service_snapshot(settings, args.timeout or 10.0)
    rebuilt, seconds = await _rebuilt_snapshot(settings, service.position if service else None)
    diffs = _differences(rebuilt, service) if service is not None else []
    equal = None if service is None else not diffs
    if args.json:
        _print_json({"registry": str(settings.registry_path), "seconds": round(seconds, 6),
                     "rebuilt": rebuilt.summary(), "service": service.summary() if service else None,
                     "equal": equal, "differences": diffs})
        return 1 if diffs else 0
    console = _console()
    console.print(f"rebuilt the projections of {settings.registry_path} from {rebuilt.events} events "
                  f"(up to position {rebuilt.position}) in {seconds * 1000:.1f} ms")
    rows = []
    for key, value in rebuilt.summary().items():
        theirs = service.summary()[key] if service else None
        rows.append([key, value, "-" if service is None else theirs,
                     "" if service is None else ("equal" if theirs == value else "DIFFERENT")])
    if service is not None:
        for kind, mine, theirs in (("model records", rebuilt.model_records, service.model_records),
                                   ("topic records", rebuilt.topic_records, service.topic_records)):
            rows.append([kind, len(mine), len(theirs), "equal" if mine == theirs else "DIFFERENT"])
    _table(None, ["", "REBUILT", "SERVICE", ""], rows)
    if service is None:
        console.print("no running service answered: nothing to compare with (the rebuilt state is above)")
    elif diffs:
        console.print("the rebuilt state differs from the service's:")
        for d in diffs:
            console.print(f"  {d}")
    else:
        console.print("the rebuilt state equals the running service's incrementally kept state")
    return 1 if diffs else 0


# ---------------------------------------------------------------------------------------- diagnostics


def _diagnostics(args: argparse.Namespace, settings: Settings) -> int:
    _print_json(anyio.run(lambda: _call(settings, DiagnosticsGet(), timeout=args.timeout or 30.0)))
    return 0


# ---------------------------------------------------------------------------------------- the parser


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: Callable[[argparse.ArgumentParser], None]) -> None:
    from wire.api import (
    TopicUpdate,
        CatalogList,
        ModelActivate,
        ModelGet,
        ModelImport,
        ModelLoad,
        ModelPull,
        ModelRemove,
        ModelsList,
        ModelUnload,
        TopicBind,
        TopicCreate,
        TopicGet,
        TopicList,
    )

    def leaf(parent: Any, name: str, help: str, run: Runner, *, json_flag: bool = True,
             timeout_help: str = "seconds to wait for the service (default 30)") -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        common(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print the reply as JSON (for scripts)")
        p.add_argument("--timeout", type=float, help=timeout_help)
        p.set_defaults(run=run)
        return p

    def group(name: str, help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    # -- models
    models = group("models", "registered models: list, show, import, pull, update, activate, rm, load, unload")
    p = leaf(models, "list", "list registered models", _api(
        lambda a: ModelsList(include_deleted=a.all), _render_model_list))
    p.add_argument("--all", action="store_true", help="include removed models")
    p = leaf(models, "show", "every field of one model's record", _api(
        lambda a: ModelGet(model_id=a.model_id), _render_model))
    p.add_argument("model_id", metavar="MODEL")
    p = leaf(models, "import", "register a GGUF file from a model directory (hashes it, with a progress bar)", _api(
        lambda a: ModelImport(path=a.path, name=a.name, expected_sha256=a.sha256, generation=_gen_params(a),
                              load=_load_params(a), progress_subject=a.progress_subject), _render_model, timeout=600.0, progress=lambda a: f"hashing {os.path.basename(a.path)}"),
        timeout_help="seconds to wait (default 600)")
    p.add_argument("path", help="the .gguf file: absolute, or relative to a model directory")
    p.add_argument("--name", help="display name (the model id is made from it; default: the file name)")
    p.add_argument("--sha256", help="refuse the file unless its SHA-256 is this")
    _param_flags(p)
    p = leaf(models, "pull", "download a catalogue model (see `lamabus catalog`) or a .gguf URL, then import it", _api(
        lambda a: ModelPull(ref=a.ref, name=a.name, progress_subject=a.progress_subject), _render_model, timeout=6 * 3600.0, progress=lambda a: f"pulling {a.ref.rsplit('/', 1)[-1]}"),
        timeout_help="seconds to wait (default 6 hours)")
    p.add_argument("ref", metavar="ID_OR_URL")
    p.add_argument("--name", help="display name (default: the catalogue's, or the file name)")
    p = leaf(models, "update", "change a model's stored parameters or system prompt", _api(
        _update_request, _render_model))
    p.add_argument("model_id", metavar="MODEL")
    _param_flags(p)
    p.add_argument("--reset", action="store_true", help="replace all stored parameters with the ones given")
    p.add_argument("--expected-version", type=int, help="fail with conflict unless the record is at this version")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="what this model's conversations start with")
    prompt.add_argument("--clear-system-prompt", action="store_true", help="back to the service default")
    p = leaf(models, "activate", "make a model the active one (it answers unbound topics)", _api(
        lambda a: ModelActivate(model_id=a.model_id), lambda r: _console().print(f"{r.model.id} is the active model")))
    p.add_argument("model_id", metavar="MODEL")
    p = leaf(models, "rm", "unload and remove a model (its record and history stay, marked removed)", _api(
        lambda a: ModelRemove(model_id=a.model_id), lambda r: _console().print(f"{r.model.id} removed")))
    p.add_argument("model_id", metavar="MODEL")
    p = leaf(models, "load", "load a model now (it stays loaded while in use, or until idle)", _api(
        lambda a: ModelLoad(model_id=a.model_id), _render_load, timeout=300.0),
        timeout_help="seconds to wait (default 300)")
    p.add_argument("model_id", metavar="MODEL")
    p = leaf(models, "unload", "unload a model now", _api(
        lambda a: ModelUnload(model_id=a.model_id), _render_unload, timeout=120.0))
    p.add_argument("model_id", metavar="MODEL")

    # -- catalogue
    leaf(sub, "catalog", "models lamabus knows how to get (`lamabus models pull ID`)", _api(
        lambda a: CatalogList(), _render_catalog))

    # -- topics
    topics = group("topics", "topic rooms: create, show, list, bind, prompt")
    p = leaf(topics, "create", "create a topic room", _api(
        lambda a: TopicCreate(topic_id=a.topic_id, name=a.name, model_id=a.model,
                                               created_by=a.created_by, system_prompt=a.system_prompt), _render_topic))
    p.add_argument("topic_id", metavar="TOPIC")
    p.add_argument("--name")
    p.add_argument("--model", help="bind it to this model (default: it follows the active model)")
    p.add_argument("--created-by", default=os.environ.get("USER"))
    p.add_argument("--system-prompt", help="the topic's own system prompt")
    p = leaf(topics, "show", "one topic and who answers there", _api(
        lambda a: TopicGet(topic_id=a.topic_id), _render_topic))
    p.add_argument("topic_id", metavar="TOPIC")
    leaf(topics, "list", "every topic", _api(
        lambda a: TopicList(), _render_topics))
    p = leaf(topics, "bind", "bind a topic to a model, or --unbind it (then the active model answers)", _api(
        lambda a: TopicBind(topic_id=a.topic_id, model_id=None if a.unbind else a.model_id), _render_topic))
    p.add_argument("topic_id", metavar="TOPIC")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("model_id", metavar="MODEL", nargs="?")
    which.add_argument("--unbind", action="store_true")
    p = leaf(topics, "prompt", "set the topic's own system prompt, or --clear it", _api(
        lambda a: TopicUpdate(topic_id=a.topic_id, system_prompt=None if a.clear else a.text), _render_topic))
    p.add_argument("topic_id", metavar="TOPIC")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("text", metavar="TEXT", nargs="?")
    which.add_argument("--clear", action="store_true")

    # -- the registry file
    registry = group("registry", "the event-sourced registry: its log, and rebuilding projections from it")
    p = leaf(registry, "events", "print the registry's events (reads the SQLite file under --data-dir)", _run_events,
             timeout_help="unused")
    p.add_argument("--from", dest="from_position", type=int, default=1, metavar="N", help="start at position N")
    p.add_argument("--limit", type=int, help="print at most this many (without --follow)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events as they are committed")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p = leaf(registry, "rebuild", "rebuild the projections from the log and compare them with the running "
             "service's incrementally kept state (counts, position, every record)",
             lambda a, s: anyio.run(_rebuild, a, s), timeout_help="seconds to wait for the service (default 10)")
    p.add_argument("--offline", action="store_true", help="do not ask a running service; only rebuild")

    leaf(sub, "metrics", "this node's Prometheus metrics, the text /metrics serves (lama.api.metrics)", _api(
        lambda a: MetricsGet(), lambda r: print(r.text, end="")))

    diag = sub.add_parser("diagnostics", help="what the running service holds and how it is doing (JSON)")
    common(diag)
    diag.add_argument("--timeout", type=float)
    diag.set_defaults(run=_diagnostics)

