import nats

from bus.broker.embedded import EmbeddedNatsServer


async def test_embedded_server_serves_core_and_jetstream(tmp_path):
    async with EmbeddedNatsServer(tmp_path / "js") as server:
        assert server.url and server.port
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="T", subjects=["t.>"])
            ack = await js.publish("t.x", b"hello")
            assert ack.seq == 1
            msg = await js.get_msg("T", 1)
            assert msg.data == b"hello"
        finally:
            await nc.close()
    assert server.pid is None


async def test_two_servers_get_distinct_ports(tmp_path):
    async with EmbeddedNatsServer(tmp_path / "a") as a, EmbeddedNatsServer(tmp_path / "b") as b:
        assert a.port != b.port
