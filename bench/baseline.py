"""Raw llama.cpp decode loops (low-level bindings, C sampler chain): the speed ceiling lamabus is held to.

Shared by bench/bench_engine.py and the bus benchmark. Everything runs in the
calling process; nothing of lamabus is used except engine.chat to render the
same chat prompt the engine renders.

* :meth:`RawLlama.run` - one sequence: prompt in one batch, then one token per
  ``llama_decode``, sampled by a greedy (or top-k/top-p/temp/dist) C chain.
* :meth:`RawLlama.run_batched` - ``n`` sequences in one context: all prompts in
  one batch, then every step decodes one token of every running sequence in
  one ``llama_batch`` (llama.cpp's examples/batched).

Timing: ``ttft_s`` is start -> first sampled token (prompt evaluation
included); ``tokens_per_s`` is the decode rate after the first token,
``(n - 1) / (t_last - t_first)``; batched runs report the aggregate
``total_tokens / wall`` with prompt evaluation included.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any

import llama_cpp as ll


class RawLlama:
    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int = 2,
        n_seq_max: int = 1,
        n_gpu_layers: int = 0,
        flash_attn: int | None = None,
        kv_unified: bool = False,
    ) -> None:
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = ll.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"cannot load {model_path}")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq_max
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq_max
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.kv_unified = kv_unified
        cp.no_perf = True
        if flash_attn is not None:  # None: llama.cpp's default (auto)
            cp.flash_attn_type = flash_attn
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("cannot create context")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.mem = ll.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        for i in range(n_batch):
            self.batch.n_seq_id[i] = 1
        self._buf = ctypes.create_string_buffer(256)

    def close(self) -> None:
        if self.batch is not None:
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            ll.llama_model_free(self.model)
            self.batch = None

    # ---- helpers -------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        from engine.chat import ChatTemplate
        from engine.types import ChatTurn

        raw = ll.llama_model_chat_template(self.model, None)
        bos = self.piece(ll.llama_vocab_bos(self.vocab), special=True).decode()
        eos = self.piece(ll.llama_vocab_eos(self.vocab), special=True).decode()
        tmpl = ChatTemplate(raw.decode() if raw else None, bos_token=bos, eos_token=eos)
        return tmpl.render([ChatTurn(m["role"], m["content"]) for m in messages])  # type: ignore[arg-type]

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        arr = (ll.llama_token * (len(data) + 8))()
        n = ll.llama_tokenize(self.vocab, data, len(data), arr, len(arr), add_bos, True)
        return arr[:n]

    def piece(self, tok: int, special: bool = False) -> bytes:
        n = ll.llama_token_to_piece(self.vocab, tok, self._buf, len(self._buf), 0, special)
        return self._buf.raw[:n]

    @staticmethod
    def chain(temperature: float = 0.0, top_k: int = 40, top_p: float = 1.0, seed: int = 42) -> Any:
        sp = ll.llama_sampler_chain_default_params()
        sp.no_perf = True
        c = ll.llama_sampler_chain_init(sp)
        if temperature <= 0:
            ll.llama_sampler_chain_add(c, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(c, ll.llama_sampler_init_top_k(top_k))
            ll.llama_sampler_chain_add(c, ll.llama_sampler_init_top_p(top_p, 1))
            ll.llama_sampler_chain_add(c, ll.llama_sampler_init_temp(temperature))
            ll.llama_sampler_chain_add(c, ll.llama_sampler_init_dist(seed))
        return c

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)

    # ---- loops ---------------------------------------------------------------

    def run(self, prompt_tokens: list[int], n_predict: int, *, ignore_eos: bool = True) -> dict[str, Any]:
        ll.llama_memory_clear(self.mem, True)
        smpl = self.chain()
        out: list[bytes] = []
        t0 = time.perf_counter()
        t_first = t_last = t0
        n_pos = 0
        for start in range(0, len(prompt_tokens), self.n_batch):
            chunk = prompt_tokens[start : start + self.n_batch]
            self._fill([(t, n_pos + i, 0, False) for i, t in enumerate(chunk)])
            self.batch.logits[len(chunk) - 1] = True
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("decode failed")
            n_pos += len(chunk)
        n = 0
        while n < n_predict:
            tok = ll.llama_sampler_sample(smpl, self.ctx, -1)
            if not ignore_eos and ll.llama_vocab_is_eog(self.vocab, tok):
                break
            n += 1
            t_last = time.perf_counter()
            if n == 1:
                t_first = t_last
            out.append(self.piece(tok))
            if n == n_predict:
                break
            self._fill([(tok, n_pos, 0, True)])
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("decode failed")
            n_pos += 1
        ll.llama_sampler_free(smpl)
        return {
            "tokens": n,
            "ttft_s": t_first - t0,
            "tokens_per_s": (n - 1) / (t_last - t_first) if n > 1 else 0.0,
            "text": b"".join(out).decode("utf-8", errors="replace"),
        }

    def run_batched(self, prompts: list[list[int]], n_predict: int) -> dict[str, Any]:
        """Prefill all prompts in n_batch chunks, then one token per sequence per decode (EOS ignored)."""
        ll.llama_memory_clear(self.mem, True)
        chains = [self.chain() for _ in prompts]
        texts: list[list[bytes]] = [[] for _ in prompts]
        next_tok = [0] * len(prompts)
        t0 = time.perf_counter()
        items = [(t, i, s, i == len(toks) - 1) for s, toks in enumerate(prompts) for i, t in enumerate(toks)]
        total = 0
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            self._fill(chunk)
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("decode failed")
            for j, (_, _, s, is_last) in enumerate(chunk):
                if is_last:  # sample right away: the next decode overwrites these logits
                    tok = ll.llama_sampler_sample(chains[s], self.ctx, j)
                    next_tok[s] = tok
                    texts[s].append(self.piece(tok))
                    total += 1
        t_prefilled = time.perf_counter()
        pos = [len(p) for p in prompts]
        for _ in range(n_predict - 1):
            self._fill([(next_tok[s], pos[s], s, True) for s in range(len(prompts))])
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("decode failed")
            for s, c in enumerate(chains):
                tok = ll.llama_sampler_sample(c, self.ctx, s)
                next_tok[s] = tok
                texts[s].append(self.piece(tok))
                pos[s] += 1
                total += 1
        wall = time.perf_counter() - t0
        for c in chains:
            ll.llama_sampler_free(c)
        return {
            "tokens": total,
            "wall_s": wall,
            "tokens_per_s": total / wall,
            "prefill_s": t_prefilled - t0,
            "decode_tokens_per_s": (total - len(prompts)) / (t0 + wall - t_prefilled),
            "texts": [b"".join(t).decode("utf-8", errors="replace") for t in texts],
        }
