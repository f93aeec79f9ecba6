"""Admin commands: models, catalogue, topics (over the running service's API) and the registry log.

    lamabus models list|show|import|pull|update|activate|rm|load|unload
    lamabus catalog
    lamabus topics create|show|list|bind|prompt|analysis
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
import os
from typing import Any, Callable

import anyio
import msgspec

from bus.cli.output import console, fields_table, ms_text, print_json, size_text, table
from bus.cli.registry_log import rebuild, run_events
from bus.config import Settings
from wire.api import ApiRequest, DiagnosticsGet, MetricsGet, endpoint_for
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError

Runner = Callable[[argparse.Namespace, Settings], int]


# ---------------------------------------------------------------------------------------- talking to the service


async def _call(settings: Settings, request: ApiRequest[Any], *, timeout: float,
                progress: tuple[str, Callable[[str], ApiRequest[Any]]] | None = None,
                show_progress: bool = True, node: str | None = None) -> Any:
    """Call the endpoint of ``request``; ``progress``: (description, the request made for a progress subject);
    ``node``: ask that node of a cluster (``--node``), not whichever answers first."""
    import nats.errors

    from bus.client import LamabusClient

    url = settings.client_url()
    subject = endpoint_for(request).subject(f"{settings.prefix}.api")
    async with LamabusClient.for_settings(settings) as client:
        try:
            if progress is None:
                return await client.call(request, timeout=timeout, node=node)
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
    with Progress(*columns, console=console(stderr=True), disable=not show) as bar:
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
            reply = anyio.run(lambda: _call(settings, make(args), timeout=wait, node=getattr(args, "node", None)))
        else:
            def with_subject(subject: str) -> ApiRequest[Any]:
                return make(argparse.Namespace(**vars(args), progress_subject=subject))

            reply = anyio.run(lambda: _call(settings, with_subject("-"), timeout=wait,
                                            progress=(progress(args), with_subject), show_progress=not args.json))
        if args.json:
            print_json(reply)
        else:
            render(reply)
        return 0

    return run


# ---------------------------------------------------------------------------------------- models


def _modelstable(models: list[Any], loaded: list[str], title: str | None = None) -> None:
    rows = []
    for m in models:
        state = "removed" if m.deleted else ("active" if m.active else "")
        rows.append([m.id, m.name, state, "yes" if m.id in loaded else "", m.architecture, m.quantization,
                     size_text(m.size), m.usage_count, m.provider])
    table(title, ["ID", "NAME", "STATE", "LOADED", "ARCH", "QUANT", "SIZE", "USES", "PROVIDER"], rows,
           no_wrap=(0, 2, 3, 4, 5, 6))


def _render_model_list(reply: Any) -> None:
    if not reply.models:
        console().print("no models: pull one (`lamabus catalog`, `lamabus models pull ID`) or import a GGUF file")
        return
    _modelstable(reply.models, reply.loaded)


def _render_model(reply: Any) -> None:
    fields_table(f"model {reply.model.id}", reply.model)


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


def _gpu_layers(text: str) -> int:
    from wire.params import GPU_LAYERS_AUTO

    if text.strip().lower() == "auto":
        return GPU_LAYERS_AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a layer count nor 'auto'") from None


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
    g.add_argument("--gpu-layers", type=_gpu_layers, metavar="N|auto",
                   help="layers offloaded to the GPU (auto or -1: as many as fit in free VRAM; 0: CPU; 99: all)")
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


def _on_node(reply: Any) -> str:
    return f" on node {reply.node}" if reply.node else ""


def _render_load(reply: Any) -> None:
    console().print(f"{reply.model_id} is loaded{_on_node(reply)} (loaded now: {', '.join(reply.loaded) or 'none'})")


def _render_unload(reply: Any) -> None:
    what = "unloaded" if reply.was_loaded else "was not loaded"
    console().print(f"{reply.model_id} {what}{_on_node(reply)} (loaded now: {', '.join(reply.loaded) or 'none'})")


def _node_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", metavar="NODE_ID",
                   help="ask this node of a cluster (each node has its own engine); default: any node")


# ---------------------------------------------------------------------------------------- catalogue / topics


def _render_catalog(reply: Any) -> None:
    registered = set(reply.registered)
    rows = [[e.id, e.name, e.approx_size, e.architecture, e.quantization, e.context_length, e.source,
             "yes" if e.id in registered else ""] for e in reply.models]
    table(None, ["ID", "NAME", "SIZE", "ARCH", "QUANT", "CONTEXT", "SOURCE", "REGISTERED"], rows)


def _topic_row(t: Any) -> list[Any]:
    from rich.markup import escape  # the title is model output: brackets in it are text, not styles

    model = t.bound_model_id or (f"{t.model_id} (active)" if t.model_id else "none (no active model)")
    about = (escape(f"{t.analysis.title} ({t.analysis.language})") if t.analysis
             else "" if t.analysis_enabled else "(off)")
    return [t.id, t.name, model, t.message_count, t.reply_count, ms_text(t.created), about]


def _render_topics(reply: Any) -> None:
    if not reply.topics:
        console().print("no topics yet")
        return
    table(None, ["ID", "NAME", "ANSWERED BY", "MESSAGES", "REPLIES", "CREATED", "ABOUT (ANALYSIS)"],
          [_topic_row(t) for t in reply.topics])


def _render_topic(reply: Any) -> None:
    from rich.markup import escape  # the analysis is model output: brackets in it are text, not styles

    topic = reply.topic
    fields_table(f"topic {topic.id}", msgspec.structs.replace(topic, analysis=None))
    a = topic.analysis
    if a is not None:
        table("analysis", ["field", "value"], [[k, escape(v)] for k, v in (
            ("title", a.title), ("keywords", ", ".join(a.keywords)), ("summary", a.summary),
            ("language", a.language), ("basedOnMessageId", a.based_on_message_id),
            ("by", f"{a.model_id} after {a.reply_count} replies, {ms_text(a.analysed_at)}"))])


# ---------------------------------------------------------------------------------------- diagnostics


def _render_diagnostics(reply: Any) -> None:
    """For people: the node and each loaded model, where it runs (GPU layers really offloaded, the device,
    VRAM) and its memory; ``--json`` has everything (lanes, queues, slots, error counts)."""
    svc = reply.service
    console().print(f"node {svc.node or '-'}: broker {svc.url or '-'}{' (embedded)' if svc.embedded else ''}, "
                    f"prefix {svc.prefix}; {svc.intake.in_flight} messages in flight")
    rows = []
    for m in (svc.engine or {}).get("models", []):
        g, p = m.get("gpu") or {}, (m.get("memory") or {}).get("predicted") or {}
        where = (f"{g.get('nGpuLayersUsed')}/{g.get('layers')} layers on {g.get('device')}" if g.get("nGpuLayersUsed")
                 else f"CPU: {g.get('reasonNoGPU') or '-'}")
        rows.append([m.get("name") or m.get("path"), len(m.get("handles") or []), g.get("nGpuLayersRequested"), where,
                     size_text(g.get("vramUsedByModelBytes")) if g.get("nGpuLayersUsed") else "-",
                     size_text(p.get("ramBytes") or p.get("totalBytes")), size_text(p.get("vramBytes") or 0),
                     size_text((m.get("worker") or {}).get("rssBytes"))])
    if rows:
        table("models loaded", ["model", "handles", "gpu layers asked", "runs on", "VRAM used", "RAM predicted",
                                "VRAM predicted", "worker RSS"], rows)
    else:
        console().print("no model loaded")


# ---------------------------------------------------------------------------------------- the parser


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: Callable[[argparse.ArgumentParser], None]) -> None:
    from wire.api import (
        CatalogList,
        ModelActivate,
        ModelGet,
        ModelImport,
        ModelLoad,
        ModelPull,
        ModelRemove,
        ModelsList,
        ModelUnload,
        TopicAnalysisSet,
        TopicBind,
        TopicCreate,
        TopicGet,
        TopicList,
        TopicUpdate,
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
                              load=_load_params(a), progress_subject=a.progress_subject),
        _render_model, timeout=600.0, progress=lambda a: f"hashing {os.path.basename(a.path)}"),
        timeout_help="seconds to wait (default 600)")
    p.add_argument("path", help="the .gguf file: absolute, or relative to a model directory")
    p.add_argument("--name", help="display name (the model id is made from it; default: the file name)")
    p.add_argument("--sha256", help="refuse the file unless its SHA-256 is this")
    _param_flags(p)
    p = leaf(models, "pull", "download a catalogue model (see `lamabus catalog`) or a .gguf URL, then import it", _api(
        lambda a: ModelPull(ref=a.ref, name=a.name, progress_subject=a.progress_subject),
        _render_model, timeout=6 * 3600.0, progress=lambda a: f"pulling {a.ref.rsplit('/', 1)[-1]}"),
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
        lambda a: ModelActivate(model_id=a.model_id), lambda r: console().print(f"{r.model.id} is the active model")))
    p.add_argument("model_id", metavar="MODEL")
    p = leaf(models, "rm", "unload and remove a model (its record and history stay, marked removed)", _api(
        lambda a: ModelRemove(model_id=a.model_id), lambda r: console().print(f"{r.model.id} removed")))
    p.add_argument("model_id", metavar="MODEL")
    p = leaf(models, "load", "load a model now (it stays loaded while in use, or until idle)", _api(
        lambda a: ModelLoad(model_id=a.model_id), _render_load, timeout=300.0),
        timeout_help="seconds to wait (default 300)")
    p.add_argument("model_id", metavar="MODEL")
    _node_flag(p)
    p = leaf(models, "unload", "unload a model now", _api(
        lambda a: ModelUnload(model_id=a.model_id), _render_unload, timeout=120.0))
    p.add_argument("model_id", metavar="MODEL")
    _node_flag(p)

    # -- catalogue
    leaf(sub, "catalog", "models lamabus knows how to get (`lamabus models pull ID`)", _api(
        lambda a: CatalogList(), _render_catalog))

    # -- topics
    topics = group("topics", "topic rooms: create, show, list, bind, prompt, analysis")
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
    p = leaf(topics, "analysis", "switch the topic's analysis (title, keywords, summary, language) off or on", _api(
        lambda a: TopicAnalysisSet(topic_id=a.topic_id, enabled=a.state == "on"), _render_topic))
    p.add_argument("topic_id", metavar="TOPIC")
    p.add_argument("state", choices=["on", "off"])
    p = leaf(topics, "prompt", "set the topic's own system prompt, or --clear it", _api(
        lambda a: TopicUpdate(topic_id=a.topic_id, system_prompt=None if a.clear else a.text), _render_topic))
    p.add_argument("topic_id", metavar="TOPIC")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("text", metavar="TEXT", nargs="?")
    which.add_argument("--clear", action="store_true")

    # -- the registry file
    registry = group("registry", "the event-sourced registry: its log, and rebuilding projections from it")
    p = leaf(registry, "events", "print the registry's events (reads the SQLite file under --data-dir)", run_events,
             timeout_help="unused")
    p.add_argument("--from", dest="from_position", type=int, default=1, metavar="N", help="start at position N")
    p.add_argument("--limit", type=int, help="print at most this many (without --follow)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events as they are committed")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p = leaf(registry, "rebuild", "rebuild the projections from the log and compare them with the running "
             "service's incrementally kept state (counts, position, every record)",
             lambda a, s: anyio.run(rebuild, a, s), timeout_help="seconds to wait for the service (default 10)")
    p.add_argument("--offline", action="store_true", help="do not ask a running service; only rebuild")

    p = leaf(sub, "metrics", "this node's Prometheus metrics, the text /metrics serves (lama.api.metrics)", _api(
        lambda a: MetricsGet(), lambda r: print(r.text, end="")))
    _node_flag(p)

    p = leaf(sub, "diagnostics", "what the running service holds and how it is doing: its models and where they "
             "run (every detail with --json)", _api(lambda a: DiagnosticsGet(), _render_diagnostics))
    _node_flag(p)

