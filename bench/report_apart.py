"""The sections of docs/benchmarks.md that come from benches run apart from ``python -m bench``: each
reads the JSON its bench committed in ``bench/`` (cluster, grammar, metrics, auth, analysis, KV states,
store, GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.report_format import n as _n


def cluster_section() -> str | None:
    """``python -m bench.bench_cluster`` runs apart (it needs a 3-server cluster); its last figures, if any."""
    path = Path(__file__).with_name("cluster.json")
    if not path.exists():
        return None
    from bench.bench_cluster import markdown

    return markdown(json.loads(path.read_text()))


def _side_json(name: str) -> dict[str, Any] | None:
    path = Path(__file__).with_name(name)
    return json.loads(path.read_text()) if path.exists() else None


def side_measures_section() -> str | None:
    """The ratios measured by benches that run apart, from their committed JSON files, if any."""
    rows: list[str] = []
    if (g := _side_json("grammar.json")) is not None:
        for streams, r in sorted(g.get("by_streams", {}).items(), key=lambda kv: int(kv[0])):
            rows.append(f"| JSON schema ÷ free tok/s, {streams} stream(s) (`python -m bench.bench_grammar`) | "
                        f"{_n(r.get('ratio'), '.3f')} (by worker CPU per token {_n(r.get('cpu_ratio'), '.3f')}) | "
                        f"≥ 0.8 | {'yes' if (r.get('ratio') or 0) >= 0.8 else '**no**'} |")
    if (m := _side_json("metrics.json")) is not None:
        ratio = m.get("metrics_on_off_ratio")
        rows.append(f"| metrics on ÷ off, bus tok/s (`python -m bench.bench_metrics`) | {_n(ratio, '.3f')} "
                    f"(recorder {_n(m.get('metrics_ns_per_token'), '.0f')} ns/token, bound "
                    f"{_n(m.get('metrics_cost_bound_ratio'), '.4f')}) | ≥ {m.get('metrics_target', 0.98)} | "
                    f"{'yes' if (ratio or 0) >= m.get('metrics_target', 0.98) else '**no**'} |")
    if (au := _side_json("auth.json")) is not None:  # python -m bench.bench_auth (issue 20)
        ratio = au.get("auth_secure_plain_ratio")
        target = au.get("auth_target", 0.98)
        rows.append(f"| TLS + credentials ÷ open broker, one stream's bus tok/s (`python -m bench.bench_auth`) | "
                    f"{_n(ratio, '.3f')} (the login's transport cost {_n(au.get('auth_cost_us_per_token'), '.1f')} "
                    f"µs/token, bound {_n(au.get('auth_cost_bound_ratio'), '.4f')}) | ≥ {target} | "
                    f"{'yes' if (ratio or 0) >= target else '**no**'} |")
    if (a := _side_json("analysis.json")) is not None:
        ratio = a.get("analysis_ttft_ratio")
        rows.append(f"| TTFT while a topic analysis runs ÷ idle (`python -m bench.bench_analysis`) | "
                    f"{_n(ratio, '.3f')} (paired median {_n(a.get('paired_ratio_median'), '.3f')}) | — | — |")
    if (k := _side_json("kv.json")) is not None:  # python -m bench.bench_kv: saved KV states (issue 21)
        many, few = k.get("topics_many") or {}, k.get("topics_few") or {}
        for key, label, op, bound in (
            ("topics50_over_topics8", f"{many.get('topics', 50)} topics ÷ {few.get('topics', 8)} topics, messages/s "
             f"({_n(k.get('topics50_msgs_per_s'), '.2f')} vs {_n(k.get('topics8_msgs_per_s'), '.2f')}; without the "
             f"cache {_n(k.get('topics50_msgs_per_s_no_cache'), '.2f')}) (`python -m bench.bench_kv`)", ">=", 0.8),
            ("returning_over_resident_ttft", f"TTFT of a returning ÷ a resident topic ({_n(k.get('returning_topic_ttft_ms'), '.0f')} "
             f"vs {_n(k.get('resident_topic_ttft_ms'), '.0f')} ms)", "<=", 1.5),
            ("after_restart_over_turn20_ttft", f"TTFT at turn 20 after a restart ÷ resident "
             f"({_n(k.get('after_restart_turn20_ttft_ms'), '.0f')} vs {_n(k.get('turn20_ttft_ms'), '.0f')} ms)", "<=", 1.5),
            ("rss_growth_over_kv_cache_ram", "peak RSS growth with the RAM cache full ÷ kv_cache_ram", "<=", 1.1),
        ):
            v = k.get(key)
            ok = isinstance(v, (int, float)) and (v >= bound if op == ">=" else v <= bound)
            quick = (f" ({'quick run: ' if k.get('quick') else ''}{(k.get('parameters') or {}).get('turns')} messages "
                     "a topic)" if key == "topics50_over_topics8" else "")
            rows.append(f"| {label}{quick} | {_n(v, '.3f')} | {op.replace('>=', '≥').replace('<=', '≤')} "
                        f"{bound} | {'yes' if ok else '**no**'} |")
    if (st := _side_json("store.json")) is not None and "registry_jetstream_append_p50_ms" in st:
        rows.append(f"| registry append p50, JetStream ÷ SQLite (`python -m bench.bench_store`) | "
                    f"{_n(st.get('registry_jetstream_append_p50_ratio'), '.2f')} "
                    f"({_n(st.get('registry_jetstream_append_p50_ms'), '.2f')} vs "
                    f"{_n(st.get('registry_append_p50_ms'), '.2f')} ms) | — | — |")
        rows.append(f"| registry rebuild per 100k events, JetStream ÷ SQLite | "
                    f"{_n(st.get('registry_jetstream_rebuild_ratio'), '.2f')} "
                    f"({_n(st.get('registry_jetstream_rebuild_100k_s'), '.2f')} vs "
                    f"{_n(st.get('registry_rebuild_100k_s'), '.2f')} s) | — | — |")
    if not rows:
        return None
    return "\n".join([
        "## 7. Measured apart\n",
        "Benches that need their own setup; each writes its JSON in `bench/` and this table reads the last one "
        "committed (so these figures may come from another run and another load than the rest of this page).\n",
        "| measure | figure | target | met? |", "|---|---|---|---|", *rows, ""])


def gpu_section() -> str:
    """bench/gpu_check.sh's figures (its results.json, committed as bench/gpu.json), or why there are none."""
    head = "## 8. On a GPU (`bench/gpu_check.sh`)\n\n"
    g = _side_json("gpu.json")
    if g is None:
        return head + (
            "Not measured with it: the session that wrote bench/gpu_check.sh had no GPU machine, so the script ran "
            "only in its `--cpu` and `--dry-run` modes. Issue 22 reports figures measured by hand in an earlier "
            "session on a lent NVIDIA H200 (16 cores; llama.cpp built with CUDA for sm_90; the bundled model cut to "
            "8 blocks; every layer offloaded on both sides): lamabus ÷ llama-server 0.987 on one stream (1,668 vs "
            "1,690 tok/s) and 0.988 at 8 topics (3,492 vs 3,534 tok/s aggregate); with the then default of one GPU "
            "layer lamabus ran at 643 tok/s. They were not re-measured since; the default is now every layer "
            "that fits.\n")
    tps = (g.get("single_stream") or {}).get("tps") or {}
    levels = g.get("concurrency") or []
    top = max(levels, key=lambda c: c.get("topics", 0)) if levels else {}
    gpu = g.get("gpu") or {}
    return head + "\n".join([
        f"`{g.get('command', 'bench/gpu_check.sh')}` on {g.get('date', '?')}: {gpu.get('nGpuLayersUsed')} of "
        f"{gpu.get('layers')} layers on {gpu.get('device') or '?'} (parameters: {g.get('parameters')}).\n",
        "| measure | lamabus | llama-server | lamabus ÷ llama-server |", "|---|---|---|---|",
        f"| one stream, tok/s | {_n(tps.get('bus'))} | {_n(g.get('llama_server_one_stream_tps'))} | "
        f"{_n(g.get('bus_over_llama_server_tps'), '.3f')} |",
        f"| {top.get('topics', '?')} topics, aggregate tok/s | {_n(top.get('aggregate_tps'))} | "
        f"{_n(g.get('llama_server_8_streams_tps'))} | {_n(g.get('batched8_over_llama_server'), '.3f')} |", ""])
