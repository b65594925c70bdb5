#!/usr/bin/env python3
"""The README's RecurrentGemma-2B speed table, re-runnable: builds each artifact at the 2B shapes (random
weights, or your checkpoint folder) one at a time under `/usr/bin/time -v`, then benches all of them in one
`rgexport bench` run per thread count (the memory bandwidth measured in the same run), and prints one table:
bytes against the recipe's ideal, build wall time and peak RSS, validation, decode ms, tokens/s and % of the
bandwidth limit at 2 and 1 threads, prefill tokens/s; then issue 16's goals, met or short by how much.

    python scripts/bench_2b.py                                       # ExecuTorch int4 and ONNX int4, random 2B
    python scripts/bench_2b.py --checkpoint /path/to/recurrentgemma-2b
    python scripts/bench_2b.py --artifacts onnx:int4 --out /tmp/b2 --reuse   # bench what is already built
    python scripts/bench_2b.py --artifacts onnx:int4 onnx:int4:int4_block_size=128   # a build option (-O)

Writes OUT/bench_2b.md and OUT/bench_2b.json, and each build's log beside its folder
(OUT/<backend>-<recipe>[-<option>-<value>...].log).
ONNX, ExecuTorch int4, TFLite int8 and int4 and Core ML w4 build from a stream (2B peaks 5.5-9.4 GiB); TFLite's
other recipes and Core ML's fp16 load the whole float32 model (10.7 GB) and stop at once at 2B. Core ML runs in
rgexport's MIL interpreter off macOS: its speed is not a device's, and the table marks it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rgexport.backends.base import RECIPE_BITS

GOALS = {"limit_2t_default": 60.0, "limit_2t_best": 75.0, "prefill_x": 5.0, "bytes_x": 1.1, "build_min": 10.0}


def ideal_bytes(parameters: int, recipe: str, block: int = 32) -> float | None:
    """Issue 16's ideal: parameters x the recipe's bits / 8, plus a float32 scale per `block` weights for 4-bit
    recipes (32 unless the build chose another: ONNX's `int4_block_size`), the tied embedding counted once."""
    bits = RECIPE_BITS.get(recipe)
    if bits is None:
        return None
    return parameters * (bits / 8 + (4 / block if recipe in ("int4", "w4") else 0))


def time_v(log: str) -> tuple[float | None, int | None]:
    """(wall seconds, maximum resident kB) from `/usr/bin/time -v`'s lines in a log."""
    wall = rss = None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", log)
    if m:
        wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    if m:
        rss = int(m.group(1))
    return wall, rss


def build(rgexport: str, backend: str, recipe: str, source: list[str], folder: Path, tokens: int,
          extra: list[str]) -> dict:
    log = folder.with_suffix(".log")
    cmd = ["/usr/bin/time", "-v", rgexport, "build", "--target", backend, "--recipe", recipe, *source,
           "--tokens", str(tokens), "--out", str(folder), "--force", *extra]
    print(f"== build {backend} / {recipe} -> {folder} (log: {log})", flush=True)
    t = time.monotonic()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall, rss = time_v(log.read_text())
    print(f"   exit {rc}, {(wall or time.monotonic() - t) / 60:.1f} min", flush=True)
    return {"command": " ".join(cmd[2:]), "exit": rc, "wall_s": wall, "time_v_max_rss_kb": rss, "log": str(log)}


def from_manifest(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    b, v = m["build"], m.get("validation") or {}
    stages = b["stages_peak_rss_bytes"]
    peak_stage = max(stages, key=stages.get)
    if b.get("parts") and stages[peak_stage] == b["peak_rss_bytes"]:
        part = max(b["parts"], key=lambda k: b["parts"][k]["peak_rss_bytes"])
        if b["parts"][part]["peak_rss_bytes"] == b["peak_rss_bytes"]:
            peak_stage = part
    own = (v.get("own_model") or {}).get("metrics")
    params = m["model"]["parameters"]
    return {
        "backend": m["backend"], "recipe": m["recipe"]["name"], "parameters": params,
        "bytes": m["artifact"]["total_bytes"], "files": [f["path"] for f in m["artifact"]["files"]],
        "ideal_bytes": ideal_bytes(params, m["recipe"]["name"], m["backend_facts"].get("onnx_int4_block_size", 32)),
        "stages_s": sum(b["stages_seconds"].values()), "peak_rss_bytes": b["peak_rss_bytes"], "peak_stage": peak_stage,
        "validation": v.get("status", "not run"),
        "prefill_logits": m["io"].get("prefill_logits", "all"),
        "own_model": {"mean_kl": own["mean_kl"], "top1": own["top1_agreement"]} if own else None,
    }


def bench(rgexport: str, folders: list[Path], threads: int, steps: int, rounds: int) -> dict:
    cmd = [rgexport, "bench", *map(str, folders), "--no-eager", "--no-memory", "--no-hf", "--steps", str(steps),
           "--threads", str(threads), "--rounds", str(rounds), "--json"]
    print(f"== bench, {threads} thread(s): {' '.join(cmd)}", flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout
    return json.loads(out)


def fmt_min(s: float | None) -> str:
    return "-" if s is None else f"{int(s // 60)}:{s % 60:04.1f}"


def prefill(x: dict) -> str:
    tps = x["prefill_tokens_per_s"]
    return f"{tps:.0f} ({tps / x['decode_tokens_per_s']:.1f}x)" if tps else "-"


def table(rows: list[dict], benches: dict[int, dict]) -> str:
    threads = sorted(benches, reverse=True)
    def bandwidth(t: int) -> str:
        m = benches[t]["machine"]
        each = ", ".join(f"{x['read_bandwidth_gbs']:.1f}" for x in benches[t]["results"])
        return (f"{m['memory_bandwidth_gbs']:.1f} GB/s at {t} thread{'s' * (t > 1)} (each artifact's: {each}); "
                f"a one-thread copy {m['copy_bandwidth_gbs']:.1f}")

    ts = " / ".join(str(t) for t in threads)
    rounds = benches[threads[0]]["machine"]["rounds"]
    turns = f", timed in {rounds} turns each, in turn" if rounds > 1 else ""
    lines = [f"Read bandwidth measured in each bench run, just before and after each artifact's turn{turns} (its % "
             f"of the limit uses the highest): {'; '.join(bandwidth(t) for t in threads)}.", "",
             f"| artifact | bytes (ideal) | build wall | build peak (stage) | validation | read per token "
             f"| decode ms, {ts} threads | tok/s | weights read, GB/s | % of limit | prefill tok/s (x decode) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        name = r["name"]
        res = {t: benches[t]["results"][i] for t in threads}  # bench keeps the folders' order
        ideal = f"{r['bytes']:,} ({r['ideal_bytes'] / 1e9:.2f} GB: **{r['bytes'] / r['ideal_bytes']:.2f}x**)" \
            if r["ideal_bytes"] else f"{r['bytes']:,}"
        wall = r.get("wall_s") or r["stages_s"]
        peak = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB ({r['peak_stage']})"
        val = r["validation"]
        if r["own_model"]:
            val += f"; own model KL {r['own_model']['mean_kl']:.1e}, top-1 {100 * r['own_model']['top1']:.0f} %"
        stand_in = any(res[t].get("stand_in") for t in threads)
        dec = " / ".join(f"{res[t]['decode_ms_median']:.1f}" for t in threads)
        tps = " / ".join(f"{res[t]['decode_tokens_per_s']:.1f}" for t in threads)
        pct = " / ".join(f"{100 * res[t]['fraction_of_bandwidth_limit']:.1f}" for t in threads)
        gbs = " / ".join(f"{res[t]['effective_gbs']:.1f}" for t in threads)
        pre = " / ".join(prefill(res[t]) for t in threads)
        mark = " (stand-in runtime)" if stand_in else ""
        if r.get("prefill_logits") == "last":
            mark += ", prefill returns the last logits"
        lines.append(f"| {name}{mark} | {ideal} | {fmt_min(wall)} | {peak} | {val} | "
                     f"{res[threads[0]]['bytes'] / 1e6:,.1f} MB | {dec} | {tps} | {gbs} | {pct} | {pre} |")
    return "\n".join(lines)


def goals(rows: list[dict], benches: dict[int, dict]) -> str:
    """Issue 16's goals against this run: met, or short by how much."""
    out = []
    two = benches.get(2)
    for i, r in enumerate(rows):
        name = r["name"]
        notes = []
        if two:
            x = two["results"][i]
            if x.get("stand_in"):
                notes.append("speed: stand-in runtime, not judged")
            else:
                pct = 100 * x["fraction_of_bandwidth_limit"]
                for goal, what in ((GOALS["limit_2t_default"], "default recipe"),
                                   (GOALS["limit_2t_best"], "best per target")):
                    notes.append(f"{pct:.1f} % of the limit at 2 threads vs {goal:.0f} % ({what}): "
                                 + ("met" if pct >= goal else f"short by {goal - pct:.1f} points"))
                if x["prefill_tokens_per_s"]:
                    px = x["prefill_tokens_per_s"] / x["decode_tokens_per_s"]
                    notes.append(f"prefill {px:.2f}x decode vs {GOALS['prefill_x']:.0f}x: "
                                 + ("met" if px >= GOALS["prefill_x"] else f"short by {GOALS['prefill_x'] - px:.2f}x"))
        if r["ideal_bytes"]:
            bx = r["bytes"] / r["ideal_bytes"]
            notes.append(f"bytes {bx:.2f}x the ideal vs {GOALS['bytes_x']}x: "
                         + ("met" if bx <= GOALS["bytes_x"] else f"over by {bx - GOALS['bytes_x']:.2f}x"))
        wall = (r.get("wall_s") or r["stages_s"]) / 60
        notes.append(f"build {wall:.1f} min vs {GOALS['build_min']:.0f}: "
                     + ("met" if wall <= GOALS["build_min"] else f"over by {wall - GOALS['build_min']:.1f} min"))
        out.append(f"- {name}: " + "; ".join(notes))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", nargs="+", default=["executorch:int4", "onnx:int4"],
                    help="backend:recipe[:option=value,...] ... (options go to the build as -O option=value)")
    ap.add_argument("--checkpoint", help="a RecurrentGemma checkpoint folder (default: --preset with random weights)")
    ap.add_argument("--preset", default="recurrentgemma-2b")
    ap.add_argument("--out", type=Path, default=Path("rgexport-out/bench-2b"))
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per artifact")
    ap.add_argument("--tokens", type=int, default=32, help="validation tokens of each build")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=4,
                    help="time the artifacts in turns, all loaded at once (1: one after another, for 9B)")
    ap.add_argument("--reuse", action="store_true", help="bench folders already built in OUT instead of building")
    ap.add_argument("--build-arg", action="append", default=[], help="extra argument for every build (repeatable)")
    beside = Path(sys.executable).with_name("rgexport")  # this interpreter's own, activated or not
    ap.add_argument("--rgexport", default=str(beside) if beside.exists() else shutil.which("rgexport") or "rgexport")
    args = ap.parse_args()

    source = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--preset", args.preset, "--random-weights"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, folders = [], []
    for spec in args.artifacts:
        backend, recipe, *opts = spec.split(":", 2)
        options = [o for o in (opts[0].split(",") if opts else []) if o]
        folder = args.out / "-".join([backend, recipe, *(o.replace("=", "-") for o in options)])
        timing = {}
        if not (args.reuse and (folder / "manifest.json").exists()):
            extra = [*args.build_arg, *(a for o in options for a in ("-O", o))]
            timing = build(args.rgexport, backend, recipe, source, folder, args.tokens, extra)
            if timing["exit"] != 0:
                print(f"build failed (exit {timing['exit']}): see {timing['log']}", file=sys.stderr)
                return 1
        elif folder.with_suffix(".log").exists():
            wall, rss = time_v(folder.with_suffix(".log").read_text())
            timing = {"wall_s": wall, "time_v_max_rss_kb": rss}
        rows.append(from_manifest(folder) | timing | {"name": f"{backend} / {recipe}"
                                                      + (f" ({', '.join(options)})" if options else "")})
        folders.append(folder)
    benches = {t: bench(args.rgexport, folders, t, args.steps, args.rounds) for t in args.threads}
    text = "\n".join([table(rows, benches), "", "Against issue 16's goals, in this run:", "", goals(rows, benches), ""])
    for r in rows:
        if r.get("time_v_max_rss_kb"):
            text += (f"\n{r['backend']} / {r['recipe']}: `/usr/bin/time -v` maximum resident "
                     f"{r['time_v_max_rss_kb']:,} kB; the build's own peak {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(text)
    (args.out / "bench_2b.md").write_text(text + "\n")
    data = {"builds": rows, "bench": {str(t): b for t, b in benches.items()}}
    (args.out / "bench_2b.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
