"""bus/node/service.py's boundary on a real nats-server: error replies, field paths, concurrent endpoints."""

from __future__ import annotations

import anyio
import msgspec
import nats
import pytest

from bus.client import raise_for_error
from bus.node.service import ERROR_COUNTS, Endpoint, boundary, start_service
from wire.errors import ErrorCode, LamaError

PREFIX = "t.api"


class Gate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    open: bool = False
    boom: bool = False


class Nested(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    inner: Gate


class Fixture:
    """A gate endpoint: a request with open=false waits until one with open=true arrives."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.waiting = anyio.Event()

    async def handler(self, req: Gate) -> dict:
        if req.boom:
            raise RuntimeError("kaput")
        if req.open:
            self.gate.set()
            return {"opened": True}
        self.waiting.set()
        await self.gate.wait()
        return {"passed": True}


@pytest.fixture
async def nc(nats_url: str):
    conn = await nats.connect(nats_url)
    yield conn
    await conn.drain()


async def call(nc, name: str, payload: bytes, timeout: float = 10.0) -> dict:
    reply = await nc.request(f"{PREFIX}.{name}", payload, timeout=timeout)
    raise_for_error(reply)
    return msgspec.json.decode(reply.data)


async def test_a_waiting_request_does_not_hold_up_the_next_one(nc):
    fx = Fixture()
    async with anyio.create_task_group() as tg:
        service = await start_service(nc, PREFIX, [Endpoint("", "gate", Gate, fx.handler, concurrent=True)], tg)
        results: list[dict] = []

        async def first() -> None:
            results.append(await call(nc, "gate", b"{}"))

        tg.start_soon(first)
        await fx.waiting.wait()
        # Inline handling would queue this behind the first request, which waits for it: a deadlock.
        assert await call(nc, "gate", b'{"open": true}') == {"opened": True}
        await service.stop()
    assert results == [{"passed": True}]


async def test_past_max_in_flight_the_endpoint_answers_busy(nc):
    fx = Fixture()
    async with anyio.create_task_group() as tg:
        service = await start_service(
            nc, PREFIX, [Endpoint("", "gate", Gate, fx.handler, concurrent=True, max_in_flight=1)], tg)
        results: list[dict] = []

        async def first() -> None:
            results.append(await call(nc, "gate", b"{}"))

        tg.start_soon(first)
        await fx.waiting.wait()
        before = ERROR_COUNTS[f"{PREFIX}.gate.busy"]
        with pytest.raises(LamaError) as exc:
            await call(nc, "gate", b'{"open": true}')
        assert exc.value.code is ErrorCode.BUSY and exc.value.details["max_in_flight"] == 1
        assert ERROR_COUNTS[f"{PREFIX}.gate.busy"] == before + 1
        fx.gate.set()
    await service.stop()
    assert results == [{"passed": True}]


async def test_a_request_running_at_shutdown_is_answered_cancelled(nc):
    fx = Fixture()
    outcome: list[LamaError] = []

    async def first() -> None:
        with pytest.raises(LamaError) as exc:
            await call(nc, "gate", b"{}")
        outcome.append(exc.value)

    async with anyio.create_task_group() as caller:
        async with anyio.create_task_group() as tg:
            service = await start_service(nc, PREFIX, [Endpoint("", "gate", Gate, fx.handler, concurrent=True)], tg)
            caller.start_soon(first)
            await fx.waiting.wait()
            await service.stop()
            tg.cancel_scope.cancel()
    assert [e.code for e in outcome] == [ErrorCode.CANCELLED]


@pytest.mark.parametrize("concurrent", [False, True])
async def test_errors_are_coded_replies_and_the_endpoint_lives_on(nc, concurrent: bool):
    fx = Fixture()
    async with anyio.create_task_group() as tg:
        service = await start_service(nc, PREFIX, [
            Endpoint("g", "gate", Gate, fx.handler, concurrent=concurrent),
            Endpoint("g", "nested", Nested, fx.handler, concurrent=concurrent),
        ], tg)
        cases = [
            ("g.gate", b'{"open": 1}', "$.open"),
            ("g.gate", b'{"bogus": 1}', "$.bogus"),
            ("g.nested", b'{}', "$.inner"),
            ("g.nested", b'{"inner": {"open": "no"}}', "$.inner.open"),
            ("g.nested", b'{"inner": {"what": true}}', "$.inner.what"),
        ]
        for name, payload, field in cases:
            reply = await nc.request(f"{PREFIX}.{name}", payload, timeout=10)
            assert reply.headers["Nats-Service-Error-Code"] == "400"
            body = msgspec.json.decode(reply.data)
            assert body["code"] == "bad_request" and body["details"]["field"] == field, (payload, body)
        with pytest.raises(LamaError) as exc:
            await call(nc, "g.gate", b"not json")
        assert exc.value.code is ErrorCode.BAD_REQUEST
        with pytest.raises(LamaError) as exc:
            await call(nc, "g.gate", b'{"boom": true}')
        assert exc.value.code is ErrorCode.INTERNAL and "kaput" in exc.value.message
        assert ERROR_COUNTS[f"{PREFIX}.g.gate.internal"] >= 1
        assert await call(nc, "g.gate", b'{"open": true}') == {"opened": True}  # still answering
        await service.stop()


class Inner(msgspec.Struct):
    x: int


class Outer(msgspec.Struct):
    params: Inner


def test_validation_error_names_the_missing_field_path():
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.json.decode(b'{"params": {}}', type=Outer)
    err = LamaError.from_validation(exc.value)
    assert err.code is ErrorCode.BAD_REQUEST and err.details == {"field": "$.params.x"}


def test_a_concurrent_endpoint_needs_a_task_group():
    async def handler(_: Gate) -> None:
        return None

    with pytest.raises(ValueError, match="task group"):
        boundary(Gate, handler, name="x", concurrent=True)


async def test_srv_stats_count_the_errors_the_boundary_answers(nc):
    """nats.micro counts only errors a handler raises; ours answers them itself, and $SRV.STATS still counts them."""
    fx = Fixture()
    async with anyio.create_task_group() as tg:
        service = await start_service(nc, PREFIX, [Endpoint("", "gate", Gate, fx.handler),
                                                   Endpoint("", "other", Gate, fx.handler)], tg)
        for payload in (b'{"nope": 1}', b"\xff\xfe", b'{"boom": true}'):
            with pytest.raises(LamaError):
                await call(nc, "gate", payload)
        assert await call(nc, "gate", b'{"open": true}') == {"opened": True}
        stats = msgspec.json.decode((await nc.request("$SRV.STATS.lamabus", b"", timeout=5)).data)
        by_name = {e["name"]: e for e in stats["endpoints"]}
        assert by_name["gate"]["num_requests"] == 4 and by_name["gate"]["num_errors"] == 3
        assert by_name["gate"]["last_error"].startswith("internal: RuntimeError")
        assert by_name["other"]["num_errors"] == 0
        await service.stop()
