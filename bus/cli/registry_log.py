"""``lamabus registry events`` and ``lamabus registry rebuild``: the registry's log, read from the
SQLite file under the data directory (they work with the service stopped); ``rebuild`` compares the
projections it rebuilt with the running service's incrementally kept state when one answers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

import anyio
import msgspec

from bus.cli.output import console, ms_text, print_json, table
from bus.config import Settings
from domain.mapper import RecordedEvent, follow, iter_all, read_all
from wire.api import DiagnosticsGet
from wire.errors import ErrorCode, LamaError


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


def _event_json(stored: RecordedEvent) -> dict[str, Any]:
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
    return (f"#{e['position']:<6} {ms_text(e['recordedAt'])}  {e['streamId']} v{e['version']}  {e['type']}  "
            f"{_event_summary(e['event'])}")


async def events(args: argparse.Namespace, settings: Settings) -> int:
    after = max(0, args.from_position - 1)
    async with _open_store(settings, poll_interval=args.poll) as store:
        if args.follow:
            async for recorded in follow(store, after):
                e = _event_json(recorded)
                sys.stdout.write((json.dumps(e, sort_keys=True) if args.json else _event_line(e)) + "\n")
                sys.stdout.flush()
            return 0
        events = [_event_json(r) for r in await read_all(store, after, args.limit)]
    if args.json:
        for e in events:
            sys.stdout.write(json.dumps(e, sort_keys=True) + "\n")
        sys.stdout.flush()
        return 0
    if not events:
        console().print(f"no events after position {after}")
        return 0
    table(None, ["POS", "RECORDED", "STREAM", "VER", "TYPE", "DETAILS"],
          [[e["position"], ms_text(e["recordedAt"]), e["streamId"], e["version"], e["type"],
            _event_summary(e["event"])] for e in events], no_wrap=(0, 1, 2, 4))
    return 0


def run_events(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return anyio.run(events, args, settings)
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
    from wire.api import ModelsList, TopicList

    try:
        async with LamabusClient.for_settings(settings) as client:
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
    from domain.projections import Projections

    async with _open_store(settings) as store:
        started = time.perf_counter()
        view = Projections()
        async for recorded in iter_all(store, 0):
            if up_to is not None and recorded.position > up_to:
                break
            view.apply(recorded)
        seconds = time.perf_counter() - started
        return _Snapshot(
            position=view.position, events=view.event_count, models=len(view.models),
            live_models=len(view.live_models()), topics=len(view.topics), active_model_id=view.active_model_id,
            model_records=sorted(view.models.values(), key=lambda m: m.id),
            topic_records=sorted((view.topic_info(r) for r in view.topics.values()), key=lambda t: t.id),
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


async def rebuild(args: argparse.Namespace, settings: Settings) -> int:
    service = None if args.offline else await _service_snapshot(settings, args.timeout or 10.0)
    rebuilt, seconds = await _rebuilt_snapshot(settings, service.position if service else None)
    diffs = _differences(rebuilt, service) if service is not None else []
    equal = None if service is None else not diffs
    if args.json:
        print_json({"registry": str(settings.registry_path), "seconds": round(seconds, 6),
                     "rebuilt": rebuilt.summary(), "service": service.summary() if service else None,
                     "equal": equal, "differences": diffs})
        return 1 if diffs else 0
    out = console()
    out.print(f"rebuilt the projections of {settings.registry_path} from {rebuilt.events} events "
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
    table(None, ["", "REBUILT", "SERVICE", ""], rows)
    if service is None:
        out.print("no running service answered: nothing to compare with (the rebuilt state is above)")
    elif diffs:
        out.print("the rebuilt state differs from the service's:")
        for d in diffs:
            out.print(f"  {d}")
    else:
        out.print("the rebuilt state equals the running service's incrementally kept state")
    return 1 if diffs else 0
