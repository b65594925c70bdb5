"""Benchmarks: speed of every artifact in its runtime, and proof that its memory stays flat.

Speed (`bench`): load time, first-token latency (a prompt of one prefill chunk), decode latency per token
(median and p90) and tokens/s, prefill tokens/s, peak RSS; the eager PyTorch references (our step model,
and Hugging Face's `generate`) are measured in the same run, so speed is reported as a ratio on the same
machine. Each artifact's decode is also set against the physical limit of a weight-bound decode: bytes of
weights read per token / memory bandwidth, with the bandwidth measured in the same run, just before and
just after each artifact's turn, as a read on the runtime's threads (`read_bandwidth_gbs`).

Memory (`memory_profile`): in a fresh process per N, load the artifact and decode N tokens for N in a
doubling series up to 16x the attention window; record peak RSS and the runtime's own figures. It passes
only if peak memory is flat in N within the tolerance and the manifest's state bytes equal the analytic
figure from the config. Beside it, what a transformer of the same width (and Gemma-2B) would hold as KV
cache at the same N.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.errors import RgexportError
from rgexport.memory import peak_rss_bytes, reset_peak_rss, status_bytes

# Peak RSS wanders by allocator noise; a transformer's cache of the same width would grow by
# 2 x layers x width x 4 bytes per token (18 MiB at 2048 tokens for the shipped model), far above this.
FLAT_TOLERANCE_BYTES = 4 * 1024 * 1024


def read_bandwidth_gbs(threads: int | None = None, mbytes: int = 256, repeats: int = 20) -> float:
    """Read bandwidth on `threads` threads (default: one per core), GB/s: the best of `repeats` sums over a
    float32 array of `mbytes` MiB (past any cache), which reads each byte once and writes nothing, as a
    weight-bound decode step reads its weights. The bandwidth limit is set against this. A one-thread copy
    (`memory_bandwidth_gbs`) under-reports what two threads read: on this 2-core machine 25-28 GB/s copied
    where two threads read 34-64 GB/s (notes/perf.md), and decode passed 100 % of a limit set by the copy.
    The best of many short reads, since other tenants' load moves this figure from one second to the next.
    The array is freed on return."""
    import torch

    x = torch.ones(mbytes * 1024 * 1024 // 4)
    was = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(was)
    return x.numel() * 4 / best / 1e9


def memory_bandwidth_gbs(mbytes: int = 256, repeats: int = 5) -> float:
    """Sustained read+write bandwidth of this machine (numpy copy of a large array on one thread), GB/s;
    reported beside the read bandwidth, which the limit uses (`read_bandwidth_gbs`)."""
    a = np.ones(mbytes * 1024 * 1024 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9  # read a, write b


@dataclasses.dataclass
class SpeedResult:
    name: str
    kind: str  # artifact backend / "eager" / "huggingface"
    recipe: str
    bytes: int  # weights read per decode token (Backend.weights_read_per_token; eager: 4 x parameters)
    load_s: float
    first_token_ms: float
    decode_ms_median: float
    decode_ms_p90: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float | None
    peak_rss_bytes: int
    decode_ms_by_position: list[tuple[int, float]]  # (position, median ms over the bucket)
    stand_in: str = ""  # the runner is not the artifact's runtime (Runner.stand_in)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Timing:
    """One runner under the clock: loaded and its first token timed when made, then decode steps and prefill
    chunks timed as asked, continuing one sequence (each chunk or step at the position after the last)."""

    def __init__(self, name: str, kind: str, recipe: str, nbytes: int, load: Callable[[], Any], tokens: list[int]):
        self.name, self.kind, self.recipe, self.bytes, self.tokens = name, kind, recipe, nbytes, tokens
        t = time.perf_counter()
        self.runner = load()
        self.load_s = time.perf_counter() - t
        self.chunk = self.runner.prefill_chunk
        self.runner.reset()
        t = time.perf_counter()
        if self.chunk > 1:
            self.runner.prefill(tokens[:self.chunk], 0)
        else:
            self.runner.decode(tokens[0], 0)
        self.first_ms = (time.perf_counter() - t) * 1e3
        self.position = self.chunk
        self.decode_s: list[float] = []
        self.decode_at: list[int] = []
        self.prefill_s: list[float] = []

    def _token(self, position: int) -> int:
        return self.tokens[position % len(self.tokens)]

    def prefill(self) -> None:
        if self.chunk > 1:
            chunk = [self._token(self.position + i) for i in range(self.chunk)]
            t = time.perf_counter()
            self.runner.prefill(chunk, self.position)
            self.prefill_s.append(time.perf_counter() - t)
            self.position += self.chunk

    def decode(self, steps: int, advance: Callable[[int], None]) -> None:
        for _ in range(steps):
            token = self._token(self.position)
            t = time.perf_counter()
            self.runner.decode(token, self.position)
            self.decode_s.append(time.perf_counter() - t)
            self.decode_at.append(self.position)
            self.position += 1
            advance(1)

    def result(self) -> SpeedResult:
        ms = np.array(self.decode_s) * 1e3
        buckets = max(1, min(8, len(ms) // 32))
        by_pos = [(self.decode_at[b[0]], float(np.median(ms[b]))) for b in np.array_split(np.arange(len(ms)), buckets)]
        prefill_tps = self.chunk / statistics.median(self.prefill_s) if self.prefill_s else None
        return SpeedResult(self.name, self.kind, self.recipe, self.bytes, self.load_s, self.first_ms,
                           float(np.median(ms)), float(np.percentile(ms, 90)), float(1e3 / np.median(ms)), prefill_tps,
                           peak_rss_bytes(), by_pos, getattr(self.runner, "stand_in", ""))


def time_runner(name: str, kind: str, recipe: str, nbytes: int, load: Callable[[], Any], tokens: list[int],
                decode_tokens: int, advance: Callable[[int], None] = lambda n=1: None) -> SpeedResult:
    """Times a Runner: load, one prefill chunk (first token), three more chunks, then `decode_tokens` single
    steps."""
    timing = _Timing(name, kind, recipe, nbytes, load, tokens)
    for _ in range(3):
        timing.prefill()
    timing.decode(decode_tokens, advance)
    return timing.result()


def time_hf_generate(model, tokens: list[int], new_tokens: int) -> dict[str, float]:
    """Hugging Face's RecurrentGemma `generate` (greedy) on the same weights: tokens/s after the prompt."""
    import torch

    from rgexport.references import hf_causal_lm

    hf = hf_causal_lm(model, window=model.config.attention_window_size)
    ids = torch.tensor([tokens[:32]])
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, do_sample=False)
        prompt_s = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        total = time.perf_counter() - t
    per_token = max(total - prompt_s, 1e-9) / max(1, new_tokens - 1)
    return {"decode_ms_median": per_token * 1e3, "decode_tokens_per_s": 1.0 / per_token,
            "first_token_ms": prompt_s * 1e3}


# Memory -------------------------------------------------------------------------------------------------
def _probe(artifact: Path, n: int) -> dict[str, Any]:
    """Runs in a fresh process: load the artifact, decode n tokens, report peak RSS and runtime figures."""
    from rgexport.runtime import open_artifact

    rss_start = status_bytes("VmRSS")
    runner = open_artifact(artifact)  # checksums verified before the runtime loads anything
    manifest = runner.manifest
    vocab = manifest["model"]["config"]["vocab_size"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=n)
    runner.reset()
    runner.decode(int(tokens[0]), 0)  # first call: lazy allocations belong to loading
    rss_loaded = status_bytes("VmRSS")
    load_peak = peak_rss_bytes()  # imports and loading; read before the mark is reset
    # The peak from here on covers decoding only; the imports' and loading's peak would hide any growth.
    decode_only = reset_peak_rss()
    for i in range(n):
        runner.decode(int(tokens[i]), i)
    peak = status_bytes("VmHWM") if decode_only else peak_rss_bytes()
    return {"n": n, "peak_rss_bytes": peak, "peak_covers": "decoding" if decode_only else "whole process",
            # What decoding n tokens added over the loaded process: the loaded size itself moves by a few
            # MiB from run to run (ONNX Runtime's arena, the allocator's pools), in no order of n.
            "decode_growth_bytes": max(0, peak - rss_loaded) if decode_only else None,
            "rss_after_load": rss_loaded, "rss_before_load": rss_start, "rss_end": status_bytes("VmRSS"),
            "process_peak_rss_bytes": max(load_peak, peak_rss_bytes()), "runtime": runner.memory()}


def flatness(rows: list[dict[str, Any]], tolerance: int = FLAT_TOLERANCE_BYTES) -> dict[str, Any]:
    """Whether memory grows with the number of decoded tokens, from one probe row per N.

    The measure is what decoding added over the loaded process (`decode_growth_bytes`), where every row
    has it, else the peak itself. Growth is that measure's least-squares trend across the N range, not
    its spread: a KV cache grows linearly in N, while allocator noise moves single runs by a few MiB in
    no order.
    """
    tokens = np.array([r["n"] for r in rows], dtype=np.float64)
    by_decode = all(r.get("decode_growth_bytes") is not None for r in rows)
    measure = np.array([r["decode_growth_bytes"] if by_decode else r["peak_rss_bytes"] for r in rows],
                       dtype=np.float64)
    peaks = np.array([r["peak_rss_bytes"] for r in rows], dtype=np.float64)
    slope = float(np.polyfit(tokens, measure, 1)[0]) if len(rows) > 1 else 0.0
    growth = max(0.0, slope * float(tokens.max() - tokens.min()))  # plain floats: the profile is JSON
    return {"growth_measure": "decode growth over the loaded process" if by_decode else "peak RSS",
            "peak_growth_bytes": growth,  # least-squares trend of the measure over the N range
            "peak_spread_bytes": float(peaks.max() - peaks.min()),
            "tolerance_bytes": tolerance, "flat": growth <= tolerance}


def memory_profile(artifact: Path, max_multiple: int = 16, start: int | None = None,
                   advance: Callable[[int], None] = lambda n=1: None) -> dict[str, Any]:
    """Peak memory vs decoded tokens, each N in a fresh process; flat within FLAT_TOLERANCE_BYTES passes."""
    from rgexport.config import GriffinConfig
    from rgexport.info import gemma_2b, transformer_of_same_width
    from rgexport.model import state_bytes
    from rgexport.runtime import checked_artifact

    folder, manifest = checked_artifact(artifact)  # checksums and the backend's check, before any probe loads it
    config = GriffinConfig.from_dict(manifest["model"]["config"])
    w = config.attention_window_size
    ns = []
    n = start or max(1, w // 4)
    while n <= max_multiple * w:
        ns.append(n)
        n *= 2
    rows = []
    for n in ns:
        env = dict(os.environ)
        proc = subprocess.run([sys.executable, "-m", "rgexport.bench", str(folder), str(n)], capture_output=True,
                              text=True, env=env, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise RgexportError(f"memory probe of {folder} for N={n} failed: {last}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        advance(1)
    verdict = flatness(rows)
    analytic = state_bytes(config)
    manifest_state = manifest["io"]["state"]["total_bytes"]
    # Manifest state may be held in another dtype (Core ML keeps fp16 states): compare element counts.
    itemsizes = {t["dtype"] for t in manifest["io"]["state"]["tensors"]}
    elems = sum(int(np.prod(t["shape"])) for t in manifest["io"]["state"]["tensors"])
    state_ok = elems * 4 == analytic
    transformer, gemma = transformer_of_same_width(config), gemma_2b()
    return {
        "artifact": str(folder),
        "backend": manifest["backend"],
        "recipe": manifest["recipe"]["name"],
        "rows": [r | {"transformer_kv_bytes": transformer.at(r["n"]), "gemma_2b_kv_bytes": gemma.at(r["n"])}
                 for r in rows],
        **verdict,
        "state_bytes_manifest": manifest_state,
        "state_dtypes": sorted(itemsizes),
        "state_bytes_analytic_fp32": analytic,
        "state_matches_analytic": state_ok,
        "weights_bytes": manifest["artifact"]["total_bytes"],
        "passed": verdict["flat"] and state_ok,
    }


if __name__ == "__main__":  # the fresh-process memory probe: python -m rgexport.bench ARTIFACT N
    print(json.dumps(_probe(Path(sys.argv[1]), int(sys.argv[2]))))


def weights_read_per_token(folder: Path, manifest: dict[str, Any]) -> int:
    """Bytes of weights one decode step reads: the artifact's backend counts its decode program's weights,
    less tables it only gathers from (`Backend.weights_read_per_token`)."""
    from rgexport.backends import get_backend

    return get_backend(manifest["backend"]).weights_read_per_token(Path(folder), manifest)


def bench_artifacts(paths: list[Path], decode_tokens: int = 256, include_hf: bool = True,
                    advance: Callable[[int], None] = lambda n=1: None, include_eager: bool = True,
                    threads: int | None = None, rounds: int = 1) -> dict[str, Any]:
    """Times every artifact and the eager references in one process; returns data for reports.

    `include_eager=False` times the artifacts alone (no speed-up column): a large model's float32 reference
    (10.7 GB at RecurrentGemma-2B) would otherwise sit in memory beside the runtimes being measured.
    `threads` goes to every backend's `load` (ExecuTorch's XNNPACK pool, ONNX Runtime's intra-op pool,
    LiteRT's interpreter; Core ML has none): environment variables do not reach XNNPACK's pool.
    `rounds` > 1 loads every runner at once and times them in turns (each turn one prefill chunk and
    `decode_tokens / rounds` steps), so that what the machine does meanwhile falls on all of them alike: for
    ratios between artifacts on a shared machine. It holds all of them in memory together.
    """
    import torch

    from rgexport.checkpoint import load_source
    from rgexport.runtime import checked_artifact, open_artifact
    from rgexport.validate import EagerRunner, heldout_tokens

    loaded = [checked_artifact(p) for p in paths]  # every file checksummed and checked before any runtime loads
    if not loaded:
        raise RgexportError("give at least one artifact folder to benchmark")
    digests = {m["model"]["checkpoint"]["sha256"] for _, m in loaded}
    if len(digests) > 1:
        raise RgexportError("the artifacts come from different checkpoints; benchmark one model at a time")
    first = loaded[0][1]
    source = first["model"]["checkpoint"]["source"]
    ckpt = load_source(source, first["model"]["checkpoint"].get("preset")) if include_eager else None
    from rgexport.config import GriffinConfig
    from rgexport.tokenizer import Tokenizer

    config = GriffinConfig.from_dict(first["model"]["config"])
    if first["tokenizer"]:
        tok_file = loaded[0][0] / first["tokenizer"]["file"]
    else:
        tok_file = (ckpt or load_source(source, first["model"]["checkpoint"].get("preset"))).tokenizer_path
    tokens = heldout_tokens(Tokenizer(tok_file), decode_tokens + 64)
    copy_bandwidth = memory_bandwidth_gbs()
    chunk = first["io"]["prefill_chunk"]
    entries = []  # (name, kind, recipe, bytes read per token, load, threads for the bandwidth read)
    if include_eager:
        entries.append(("eager (rgexport step model)", "eager", "fp32", 4 * config.num_parameters(),
                        lambda: EagerRunner(ckpt.model, chunk), torch.get_num_threads()))
    names = [f"{m['backend']} / {m['recipe']['name']}"
             + (" (prefill: last logits)" if m["io"].get("prefill_logits") == "last" else "") for _, m in loaded]
    # Two artifacts of one backend and recipe (built with other options) are told apart by their folders.
    names = [f"{n} ({Path(f).name})" if names.count(n) > 1 else n for n, (f, _) in zip(names, loaded)]
    for name, (folder, manifest) in zip(names, loaded):
        load = lambda f=folder, m=manifest: open_artifact(f, manifest=m, threads=threads, verify=False)  # noqa: E731
        entries.append((name, manifest["backend"], manifest["recipe"]["name"], weights_read_per_token(folder, manifest),
                        load, threads))
    bandwidths: list[list[float]] = [[] for _ in entries]

    def turn(i: int, work: Callable[[], Any]) -> Any:
        """`work` between two reads of the bandwidth: this machine's moves from minute to minute."""
        bandwidths[i].append(read_bandwidth_gbs(entries[i][-1]))
        done = work()
        bandwidths[i].append(read_bandwidth_gbs(entries[i][-1]))
        return done

    if rounds <= 1:  # one runner loaded at a time
        results = [turn(i, lambda e=e: time_runner(*e[:5], tokens, decode_tokens, advance))
                   for i, e in enumerate(entries)]
    else:
        # Every runner loaded at once, then turns of (one prefill chunk, decode_tokens / rounds steps) in turn, so
        # that a slow minute of the machine falls on all of them alike.
        timings = [_Timing(*e[:5], tokens) for e in entries]
        for part in np.array_split(np.arange(decode_tokens), rounds):
            for i, timing in enumerate(timings):
                turn(i, lambda t=timing, n=len(part): (t.prefill(), t.decode(n, advance)))
        results = [t.result() for t in timings]
    hf = time_hf_generate(ckpt.model, tokens, min(decode_tokens, 128)) if include_hf and include_eager else None
    eager_ms = results[0].decode_ms_median if include_eager else None
    rows = []
    for r, samples in zip(results, bandwidths):
        bandwidth = max(samples)  # the most this machine read around the runner's turns: the limit, conservatively
        limit_ms = r.bytes / (bandwidth * 1e9) * 1e3  # every weight byte read once per token
        rows.append(r.to_dict() | {
            "speedup_vs_eager": eager_ms / r.decode_ms_median if eager_ms else None,
            "read_bandwidth_gbs": bandwidth,
            "read_bandwidth_samples_gbs": samples,
            "effective_gbs": r.bytes / r.decode_ms_median / 1e6,
            "bandwidth_limit_ms": limit_ms,
            "fraction_of_bandwidth_limit": limit_ms / r.decode_ms_median,
        })
    return {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "runtime_threads": threads,
                    "memory_bandwidth_gbs": statistics.median(max(b) for b in bandwidths),
                    "bandwidth_measure": f"read on {threads or os.cpu_count()} thread(s), the best of 20 sums over "
                                         "256 MiB just before and again just after each runner's turn; each row's "
                                         "limit uses its highest (the median of those here)",
                    "rounds": max(1, rounds),
                    "copy_bandwidth_gbs": copy_bandwidth},
        "model": {"parameters": config.num_parameters(), "source": source},
        "decode_tokens": decode_tokens,
        "results": rows,
        "huggingface_generate": hf | {"speedup_vs_eager": eager_ms / hf["decode_ms_median"]} if hf else None,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_report(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"Decode over {data['decode_tokens']} tokens; {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
        f"measured memory bandwidth {m['memory_bandwidth_gbs']:.1f} GB/s"
        + (f" ({m['bandwidth_measure']}; a one-thread copy: {m['copy_bandwidth_gbs']:.1f} GB/s)"
           if "bandwidth_measure" in m else "") + ".",
        "",
        "| artifact | MB read per token | load s | first token ms | decode ms (median / p90) | tok/s | prefill tok/s "
        "| x eager | % of bandwidth limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    stand_ins = []
    for r in data["results"]:
        prefill = f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-"
        mark = ""
        if r.get("stand_in"):
            stand_ins.append(f"{r['name']}: {r['stand_in']}")
            mark = " " + "*" * len(stand_ins)
        lines.append(
            f"| {r['name']}{mark} | {r['bytes'] / 1e6:.2f} | {r['load_s']:.2f} | {r['first_token_ms']:.2f} | "
            f"{r['decode_ms_median']:.3f} / {r['decode_ms_p90']:.3f} | {r['decode_tokens_per_s']:.0f} | {prefill} | "
            f"{_fmt(r['speedup_vs_eager'], '.1f')} | {100 * r['fraction_of_bandwidth_limit']:.1f} |")
    hf = data.get("huggingface_generate")
    if hf:
        lines.append(f"| Hugging Face generate (eager) | | | {hf['first_token_ms']:.2f} | "
                     f"{hf['decode_ms_median']:.3f} | {hf['decode_tokens_per_s']:.0f} | | "
                     f"{hf['speedup_vs_eager']:.2f} | |")
    lines += ["", *("*" * (i + 1) + " " + note for i, note in enumerate(stand_ins))] if stand_ins else []
    return "\n".join(lines) + "\n"


