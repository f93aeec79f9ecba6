"""The llama.cpp runtime: load models in supervised worker processes, generate, release.

Knows nothing of NATS or SQLite. See ``engine.runtime.Engine`` for the one API.

Modules:

* ``runtime``  - ``Engine``: handles, refcounted models, worker supervision, restarts, diagnostics.
* ``worker_process`` - the parent's side of one worker: start it, send commands, read its frames, notice death.
* ``worker``   - ``python -m engine.worker``: one model + one context per process; the admit/decode/sample loop.
* ``binding``  - the worker's llama.cpp binding: load, vocabulary, chat template, samplers, batch decode.
* ``scheduler``- sequence slots (pure): prefix reuse, consecutive running ids, what each decode step holds.
* ``protocol`` - length-prefixed msgpack frames between the two (tagged msgspec Structs), read and written
  by the same code on both ends.
* ``gguf``     - GGUF header reader (model info without weights; precise diagnosis of broken files).
* ``memory``   - memory prediction (weights + KV + compute, RAM and VRAM) against MemAvailable / cgroup limits
  and the free VRAM; ``plan_load`` picks the GPU layers ("auto": as many as fit) and the sequences.
* ``gpu``      - what GPU llama.cpp can use and its free memory (a probe child for the parent; ggml's device
  API and llama.cpp's own log lines for the worker); the ``LAMABUS_GPU_FAULT`` test hook.
* ``chat``     - chat templates from GGUF metadata (jinja2, ChatML fallback) and history fitting.
* ``text``     - streaming UTF-8 / ``<think>`` / stop-sequence processing.
* ``types``    - the data contract with the rest of lamabus.

Semantics worth knowing:

* ``ModelConfig.n_ctx`` is per sequence: the context holds ``n_seq_max`` sequences of ``n_ctx``
  cells each (non-unified KV cache), and the memory prediction counts ``n_ctx x n_seq_max``.
* A prompt gets ``n_ctx - min(max_tokens, n_ctx // 2)`` tokens; longer histories lose their oldest
  non-system turns, then the middle of the longest remaining turn. A generation that fills its
  sequence ends with ``finish_reason="length"``.
* ``Timing.tokens_per_second`` is the decode rate after the first token; ``time_to_first_token``
  and ``elapsed_time`` count from the moment the request got a sequence slot; ``queue_time`` is
  the wait for that slot.
* A grammar (``SamplingParams.grammar``, or ``json_schema`` converted to one) is compiled when the
  request reaches its worker, so a bad one fails before any token. It judges the content only
  (``TextPipeline.takes_grammar``: not a thinking block), and only the token the plain chain picked;
  the whole vocabulary goes through the grammar only when that token is rejected (llama.cpp's fast
  path; bench/bench_grammar.py measures what it costs).
* Greedy decoding is deterministic for the same prompt evaluated the same way. A prompt whose
  prefix is reused from a *different* prompt's KV cache may differ in late digits of the logits
  (llama.cpp's matmuls round differently by batch size), which can flip near-tied tokens on tiny
  models; llama.cpp's own loop does the same (see tests/test_engine_model.py).
"""
