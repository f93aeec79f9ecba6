"""The llama.cpp binding of a worker: one model, one context, its vocabulary, template and samplers.

Only ``python -m engine.worker`` imports this module, and only there is ``llama_cpp``
imported: a native crash (a bad build, a corrupt file, an abort in llama.cpp) takes
down the worker, never the service. Everything here runs on the worker's main thread.

Generation never touches Python-level sampling: ``llama_sampler_sample`` picks the
token in C from a per-generation sampler chain.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from engine import gpu
from engine.chat import ChatTemplate
from engine.protocol import Loaded
from engine.scheduler import Segment
from engine.types import ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.params import SamplingParams

AMX_MARKER = "AMX_INT8 = 1"
GGML_LOG_WARN = 3
_GGML_LOG_CONT = 5


def check_build(system_info: str) -> None:
    """Refuse a build whose AMX int8 kernels are on: on these CPUs it segfaults in the first decode."""
    if AMX_MARKER in system_info:
        raise LamaError(
            ErrorCode.MODEL_LOAD_FAILED,
            "this llama-cpp-python build enables ggml's AMX int8 kernels (llama_print_system_info reports "
            "AMX_INT8 = 1), which crash on this CPU; rebuild it with GGML_NATIVE=OFF (run ./install.sh)",
            system_info=system_info,
        )


# llama-cpp-python 0.3.36's schema converter lets control characters (a raw newline) into JSON
# strings, which JSON parsers refuse; llama.cpp's own converter has since excluded them.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


class Llama:
    """A loaded model and its context. Implements the scheduler's ``KvCache`` port."""

    def __init__(self) -> None:
        self.log_tail: deque[str] = deque(maxlen=40)
        self.log_level = GGML_LOG_WARN
        self.ll: Any = None  # the llama_cpp module
        self.model = None
        self.ctx = None
        self.vocab = None
        self.mem = None
        self.batch = None
        self.config: ModelConfig | None = None
        self.pieces: dict[int, bytes] = {}
        self.template: ChatTemplate | None = None
        self.add_bos = False
        self.bos_text = ""
        self.n_ctx_seq = 0
        self.n_batch = 0
        self.n_seq = 0
        self._log_cb = None
        self._forwarding = False
        self._captured: list[str] | None = None
        self._load_lines: list[str] | None = None  # every log line of a load (GPU layers, buffer sizes)

    # ---- logs -----------------------------------------------------------

    def _log(self, level: int, text: bytes, _user: Any) -> None:
        s = text.decode("utf-8", errors="replace") if text else ""
        if self._captured is not None:
            self._captured.append(s)
        if self._load_lines is not None:
            self._load_lines.append(s)
        if level == _GGML_LOG_CONT and self.log_tail:
            self.log_tail[-1] += s
            forward = self._forwarding
        else:
            self.log_tail.append(s)
            forward = self._forwarding = level >= self.log_level
        if forward:
            sys.stderr.write(s)

    def last_log(self) -> str:
        lines = [line.strip() for line in self.log_tail if line.strip()]
        return " | ".join(lines[-6:])

    # ---- loading --------------------------------------------------------

    def load(self, cfg: ModelConfig, log_level: int, t0: float) -> Loaded:
        if self.ctx is not None:
            raise LamaError(ErrorCode.INTERNAL, "this worker already holds a model")
        self.log_level = log_level
        try:
            import llama_cpp as ll
        except Exception as exc:
            raise LamaError(ErrorCode.MODEL_LOAD_FAILED, f"llama-cpp-python cannot be imported: {exc!r}") from None
        self.ll = ll
        self._log_cb = ll.llama_log_callback(self._log)  # kept: llama.cpp holds only the C pointer
        ll.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        ll.llama_backend_init()
        system_info = (ll.llama_print_system_info() or b"").decode(errors="replace")
        check_build(system_info)
        supports_gpu = bool(ll.llama_supports_gpu_offload())
        # The test hook (engine/gpu.py): a first load with GPU layers fails as an out-of-VRAM one would.
        fail_gpu_load = "load-fail" in gpu.faults()
        requested = cfg.n_gpu_layers  # a count: the parent's plan (engine.memory.plan_load) resolved "auto"
        reason_no_gpu: str | None = None
        n_gpu = requested
        fell_back = False
        if requested == 0:
            reason_no_gpu = "n_gpu_layers is 0"
        elif not supports_gpu and not fail_gpu_load:
            n_gpu = 0
            reason_no_gpu = "this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is false); using CPU"
        before = gpu.devices(ll) if supports_gpu else None

        self._load_lines = []
        try:
            if fail_gpu_load and n_gpu != 0:
                model = ctx = None
                why = f"{gpu.FAULT_ENV}=load-fail: a simulated out-of-VRAM allocation"
            else:
                model, ctx = self._load_model_and_context(cfg, n_gpu)
                why = self.last_log() or "no reason logged"
            if (model is None or ctx is None) and n_gpu != 0:
                # Never a crash for a GPU that cannot take the model (driver, VRAM): the CPU gets it.
                model, ctx = self._load_model_and_context(cfg, 0)
                if model is not None and ctx is not None:
                    reason_no_gpu = f"loading with n_gpu_layers={n_gpu} failed ({why}); fell back to CPU"
                    n_gpu, fell_back = 0, True
            load_lines = self._load_lines
        finally:
            self._load_lines = None
        if model is None:
            raise LamaError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"llama.cpp could not load {cfg.model_path}: {self.last_log() or 'no reason logged'}",
                path=cfg.model_path,
            )
        if ctx is None:
            ll.llama_model_free(model)
            log = self.last_log()
            code = ErrorCode.OUT_OF_MEMORY if "alloc" in log.lower() or "memory" in log.lower() else ErrorCode.MODEL_LOAD_FAILED
            raise LamaError(code, f"llama.cpp could not create a context for {cfg.model_path}: {log or 'no reason logged'}")
        self.model, self.ctx, self.config = model, ctx, cfg
        self.vocab = ll.llama_model_get_vocab(model)
        self.mem = ll.llama_get_memory(ctx)
        self.n_ctx_seq = int(ll.llama_n_ctx_seq(ctx))
        self.n_batch = int(ll.llama_n_batch(ctx))
        self.n_seq = int(ll.llama_n_seq_max(ctx))
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):
            self.batch.n_seq_id[i] = 1
        self._seq_ptrs = [self.batch.seq_id[i] for i in range(self.n_batch)]
        self._piece_buf = ctypes.create_string_buffer(256)
        self._one = ll.llama_token_data()
        self._one_arr = ll.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))

        raw = ll.llama_model_chat_template(model, None)
        source = raw.decode("utf-8", errors="replace") if raw else None
        bos_id, eos_id = ll.llama_vocab_bos(self.vocab), ll.llama_vocab_eos(self.vocab)
        self.bos_text = self._piece(bos_id, special=True).decode(errors="replace") if bos_id >= 0 else ""
        eos_text = self._piece(eos_id, special=True).decode(errors="replace") if eos_id >= 0 else ""
        self.template = ChatTemplate(source, bos_token=self.bos_text, eos_token=eos_text)
        # What llama.cpp itself says it offloaded ("offloaded 9/9 layers to GPU"), not what was asked.
        offloaded = gpu.offloaded_layers(load_lines) if supports_gpu and n_gpu != 0 else 0
        if offloaded is None:
            offloaded = min(n_gpu, int(ll.llama_model_n_layer(model)) + 1) if n_gpu > 0 else 0
        after = gpu.devices(ll) if supports_gpu else None
        vram_used = (sum(d.free_bytes for d in before) - sum(d.free_bytes for d in after)
                     if before and after and len(before) == len(after) else None)
        return Loaded(
            pid=os.getpid(),
            llama_cpp_version=str(getattr(ll, "__version__", "unknown")),
            system_info=system_info.strip(),
            supports_gpu_offload=supports_gpu,
            n_gpu_layers_requested=requested,
            n_gpu_layers_used=offloaded,
            reason_no_gpu=reason_no_gpu,
            n_ctx_seq=self.n_ctx_seq,
            n_seq_max=self.n_seq,
            n_batch=self.n_batch,
            n_threads=cfg.n_threads,
            chat_template_source="gguf" if self.template.fallback_reason is None else "chatml-fallback",
            chat_template_note=self.template.fallback_reason,
            load_seconds=time.perf_counter() - t0,
            model_bytes=int(ll.llama_model_size(model)),
            n_params=int(ll.llama_model_n_params(model)),
            gpu_devices=tuple(after or ()),
            vram_used_bytes=vram_used,
            buffers=gpu.buffer_sizes(load_lines),
            gpu_fallback=fell_back,
        )

    def _load_model_and_context(self, cfg: ModelConfig, n_gpu: int) -> tuple[Any, Any]:
        ll = self.ll
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu
        model = ll.llama_model_load_from_file(cfg.model_path.encode(), mparams)
        if not model:
            return None, None
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx * cfg.n_seq_max
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        cparams.n_seq_max = cfg.n_seq_max
        cparams.n_threads = cfg.n_threads
        cparams.n_threads_batch = cfg.n_threads
        cparams.kv_unified = False  # every sequence gets its own n_ctx cells; attention only over its own
        cparams.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[cfg.flash_attention]  # LLAMA_FLASH_ATTN_TYPE_*
        cparams.no_perf = True
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            if n_gpu != 0:
                ll.llama_model_free(model)
                return None, None
            return model, None
        return model, ctx

    def close(self) -> None:
        ll = self.ll
        if ll is None:
            return
        if self.batch is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            ll.llama_model_free(self.model)
            self.model = None

    # ---- tokens ---------------------------------------------------------

    def _piece(self, tok: int, special: bool = False) -> bytes:
        ll, buf = self.ll, self._piece_buf
        n = ll.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, tok, big, len(big), 0, special)
            return big.raw[:n]
        return buf.raw[:n]

    def piece(self, tok: int) -> bytes:
        p = self.pieces.get(tok)
        if p is None:
            p = self.pieces[tok] = self._piece(tok)
        return p

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        ll = self.ll
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        return arr[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, tok: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self.vocab, tok))

    # ---- samplers -------------------------------------------------------

    def make_chain(self, s: SamplingParams, first: Any = None) -> Any:
        """The C sampler chain for ``s``; ``first`` (a grammar) goes before the others, owned by the chain."""
        ll = self.ll
        sp = ll.llama_sampler_chain_default_params()
        sp.no_perf = True
        chain = ll.llama_sampler_chain_init(sp)
        if first is not None:
            ll.llama_sampler_chain_add(chain, first)
        if s.temperature <= 0.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else ll.LLAMA_DEFAULT_SEED
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    # ---- grammars -------------------------------------------------------

    def make_grammar(self, s: SamplingParams) -> tuple[Any, Any]:
        """``(grammar, chain)`` for ``s.grammar`` / ``s.json_schema``: the grammar sampler (for the
        fast check) and a chain that applies it to every candidate before sampling (the resample),
        which owns it. A grammar llama.cpp cannot parse is a ``bad_request`` naming the field."""
        if s.json_schema is not None:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            field = "params.jsonSchema"
            try:
                gbnf = json_schema_to_gbnf(json.dumps(s.json_schema)).replace(_LOOSE_CHAR, _STRICT_CHAR)
            except Exception as exc:  # the converter reports with assert, KeyError, AttributeError, ...
                raise LamaError(
                    ErrorCode.BAD_REQUEST, f"{field} cannot be turned into a grammar: {exc or type(exc).__name__}",
                    field=field,
                ) from None
        else:
            assert s.grammar is not None
            field, gbnf = "params.grammar", s.grammar
        grammar = self._init_grammar(gbnf, field)
        return grammar, self.make_chain(s, first=grammar)

    def _init_grammar(self, gbnf: str, field: str) -> Any:
        # llama.cpp's parser prints its reason with fprintf(stderr) and the checks after it log
        # through the callback; both are caught here so that the reason reaches the caller.
        ll = self.ll
        self._captured = []
        saved = os.dup(2)
        try:
            with tempfile.TemporaryFile() as tmp:
                sys.stderr.flush()
                os.dup2(tmp.fileno(), 2)
                try:
                    grammar = ll.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
                finally:
                    os.dup2(saved, 2)
                tmp.seek(0)
                printed = tmp.read().decode("utf-8", errors="replace")
            logged = self._captured
        finally:
            os.close(saved)
            self._captured = None
        if grammar:
            return grammar
        # llama-cpp-python would add a NULL sampler to a chain unchecked; it never gets that far.
        raise LamaError(ErrorCode.BAD_REQUEST, f"{field} does not parse: {_grammar_reason(printed, logged)}", field=field)

    def grammar_allows(self, grammar: Any, tok: int) -> bool:
        """The grammar's verdict on one token: llama.cpp's check before a resample (cheap: one candidate)."""
        one, arr = self._one, self._one_arr
        one.id, one.logit, one.p = tok, 0.0, 0.0
        arr.size, arr.selected, arr.sorted = 1, -1, False
        self.ll.llama_sampler_apply(grammar, ctypes.byref(arr))
        return one.logit != -math.inf

    def grammar_accept(self, grammar: Any, tok: int) -> None:
        self.ll.llama_sampler_accept(grammar, tok)

    def free_sampler(self, smpl: Any) -> None:
        self.ll.llama_sampler_free(smpl)

    def sample(self, chain: Any, idx: int) -> int:
        return self.ll.llama_sampler_sample(chain, self.ctx, idx)

    # ---- decoding -------------------------------------------------------

    def decode(self, segments: Sequence[Segment]) -> tuple[int, list[int]]:
        """One ``llama_decode`` of ``segments`` in their order; returns its status and, per segment,
        the batch index of its logits (-1 where none were asked for)."""
        batch = self.batch
        tok_arr, pos_arr, logits_arr, seq_ptrs = batch.token, batch.pos, batch.logits, self._seq_ptrs
        n = 0
        idx: list[int] = []
        for seg in segments:
            seq, pos = seg.seq, seg.pos
            for i, t in enumerate(seg.tokens):
                tok_arr[n] = t
                pos_arr[n] = pos + i
                seq_ptrs[n][0] = seq
                logits_arr[n] = 0
                n += 1
            if seg.logits:
                logits_arr[n - 1] = 1
                idx.append(n - 1)
            else:
                idx.append(-1)
        batch.n_tokens = n
        return self.ll.llama_decode(self.ctx, batch), idx

    # ---- KV cache (the scheduler's port) --------------------------------

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        return bool(self.ll.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int) -> None:
        self.ll.llama_memory_seq_cp(self.mem, src, dst, -1, -1)  # non-unified: a stream copy, done in the next decode

    # ---- sequence states (engine/kv_cache.py) ------------------------------

    def seq_state(self, seq: int) -> Any:
        """A copy of ``seq``'s KV cells (``llama_state_seq_get_data``), or None when it cannot be taken.

        A ctypes buffer, kept as it is: no second copy into ``bytes`` (it has the buffer protocol)."""
        ll = self.ll
        n = int(ll.llama_state_seq_get_size(self.ctx, seq))
        if n <= 0:
            return None
        buf = (ctypes.c_uint8 * n)()
        got = int(ll.llama_state_seq_get_data(self.ctx, buf, n, seq))
        return buf if got == n else None

    def set_seq_state(self, seq: int, data: Any) -> bool:
        """Put a state from :meth:`seq_state` (this model, this load configuration) into ``seq``, which
        must be empty. False (and ``seq`` left empty) when llama.cpp refuses it."""
        ll = self.ll
        if isinstance(data, bytearray):
            arr = (ctypes.c_uint8 * len(data)).from_buffer(data)  # no copy
        else:
            arr = data
        n = ctypes.sizeof(arr)
        if int(ll.llama_state_seq_set_data(self.ctx, arr, n, seq)) == 0:
            ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
            return False
        return True


def _grammar_reason(printed: str, logged: list[str]) -> str:
    for line in printed.splitlines():
        if "error parsing grammar:" in line:
            reason = line.split("error parsing grammar:", 1)[1].strip()
            break
    else:
        # the log callback forwards errors to stderr as well: the logged lines alone, or what was printed
        lines = [x.strip() for x in logged if x.strip() and x.strip() != "failed to parse grammar"]
        reason = "; ".join(lines) or printed.strip().partition("\n")[0] or "llama.cpp gave no reason"
    return reason if len(reason) <= 300 else reason[:300] + "…"
