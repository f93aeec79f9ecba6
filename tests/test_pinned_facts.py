"""Facts pinned to known answers, read from a running service (issue 16, point 7)."""

from __future__ import annotations

import os

import msgspec
import pytest

from wire.identity import person_id_for
from wire.messages import GenerationCompleted
from wire.params import GenerationParams

pytestmark = pytest.mark.model

BUNDLED_ID = "smollm2-135m-instruct"
# SHA-256 of "smollm2-135m-instruct@llama.local", the seed's rule, computed once by hand:
# printf '%s' smollm2-135m-instruct@llama.local | sha256sum
BUNDLED_PERSON_ID = "1eb646d75c59cc9f3bce13dd06bbf91d457477a632e317908f6e440df81f9098"


def _physical_cores() -> int:
    with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
        siblings = sum(int(b) - int(a) + 1 if b else 1 for a, _, b in (p.partition("-") for p in f.read().strip().split(",")))
    return max(1, len(os.sched_getaffinity(0)) // siblings)


def test_the_ai_identity_rule_has_its_known_answer() -> None:
    assert person_id_for(BUNDLED_ID) == BUNDLED_PERSON_ID
    assert person_id_for("SmolLM2 135M Instruct") == BUNDLED_PERSON_ID  # the same slug, the same person


async def test_the_running_service_speaks_as_the_known_identity_with_the_seed_defaults(service, client):
    items = [i async for i in client.ask("facts", "Hi", params=GenerationParams(max_tokens=2))]
    completed = items[-1]
    assert isinstance(completed, GenerationCompleted)
    assert (completed.model_id, completed.author_id) == (BUNDLED_ID, BUNDLED_PERSON_ID)

    reply = await client.nc.request(f"{service.subjects.api}.diagnostics", b"{}", timeout=10)
    diag = msgspec.json.decode(reply.data)
    defaults = diag["service"]["defaults"]
    assert (defaults["max_tokens"], defaults["temperature"], defaults["top_p"], defaults["stop"]) == (500, 0.7, 1.0, ["\n\n"])
    # n_gpu_layers: -1 is "auto" (as many layers as fit in free VRAM; none on a CPU build), not the seed's 1 (issue 22)
    assert (defaults["n_ctx"], defaults["n_batch"], defaults["n_gpu_layers"]) == (2048, 512, -1)
    assert defaults["n_threads"] == min(4, _physical_cores())
    # And what the engine actually loaded with.
    (model,) = [m for m in diag["service"]["engine"]["models"] if m["handles"]] or diag["service"]["engine"]["models"]
    context = model["context"]
    assert (context["nCtxPerSequence"], context["nBatch"], context["nThreads"]) == (2048, 512, min(4, _physical_cores()))
