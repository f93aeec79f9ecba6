"""The OpenAI-compatible HTTP API over the bus (issue 23; docs/openai.md).

A thin client of ``<prefix>.api.*``, split by role:

* :mod:`bus.gateway.server`: running it (inside ``serve --openai``, or alone as ``lamabus gateway``);
* :mod:`bus.gateway.app`: the aiohttp routes, auth checks, the error middleware, streaming;
* :mod:`bus.gateway.requests`: OpenAI request bodies (msgspec Structs) and their mapping onto the wire;
* :mod:`bus.gateway.responses`: lamabus's replies as OpenAI objects and stream chunks;
* :mod:`bus.gateway.sse`: server-sent events;
* :mod:`bus.gateway.errors`: errors in OpenAI's shape and status codes;
* :mod:`bus.gateway.auth`: Bearer keys -> roles;
* :mod:`bus.gateway.upstream`: the bus side (handles, ``llm.generate_stream`` on the handle's node, cancel,
  the generating node's liveness).
"""
