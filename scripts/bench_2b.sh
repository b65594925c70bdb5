#!/usr/bin/env bash
# The README's RecurrentGemma-2B speed and memory figures, re-runnable: builds each artifact at the 2B shapes
# (random weights, or your checkpoint folder), prints each build's wall time, per-stage peak RSS and bytes
# against the recipe's ideal, then benches every artifact at 1 and 2 threads, the bandwidth measured in the
# same run.
#
#   scripts/bench_2b.sh                                   # ONNX int4, random 2B weights
#   CHECKPOINT=/path/to/recurrentgemma-2b scripts/bench_2b.sh
#   ARTIFACTS="onnx:int4 executorch:int4" OUT=/tmp/b2 scripts/bench_2b.sh
#
# One build at a time; each one's log is OUT/<backend>-<recipe>.log. ONNX, ExecuTorch int4 and Core ML w4
# build from a stream (2B int4 peaks: ONNX 6.33 GiB, ExecuTorch 6.92 GiB, Core ML w4 5.90 GiB; 9B ONNX int4
# 15.52 GiB); TFLite and Core ML's fp16 load the whole float32 model (10.7 GB) and need more memory than that.
# Core ML runs in rgexport's MIL interpreter off macOS: its bench figures are not a device's.
set -euo pipefail

ARTIFACTS=${ARTIFACTS:-onnx:int4}
OUT=${OUT:-rgexport-out/bench-2b}
STEPS=${STEPS:-32}
RGEXPORT=${RGEXPORT:-rgexport}
if [[ -n "${CHECKPOINT:-}" ]]; then
  SOURCE=(--checkpoint "$CHECKPOINT")
else
  SOURCE=(--preset recurrentgemma-2b --random-weights)
fi
mkdir -p "$OUT"

folders=()
for spec in $ARTIFACTS; do
  backend=${spec%%:*}
  recipe=${spec##*:}
  folder="$OUT/$backend-$recipe"
  echo "== build $backend / $recipe -> $folder (log: $folder.log)"
  /usr/bin/time -v "$RGEXPORT" build --target "$backend" --recipe "$recipe" "${SOURCE[@]}" --tokens 32 \
    --out "$folder" --force > "$folder.log" 2>&1 || { echo "build failed: see $folder.log"; exit 1; }
  python3 - "$folder" <<'EOF'
import json, sys
from pathlib import Path

m = json.loads((Path(sys.argv[1]) / "manifest.json").read_text())
build, recipe = m["build"], m["recipe"]
params = m["model"]["parameters"]
bits = {"fp32": 32, "fp16": 16, "int8": 8, "w8a8": 8, "w8": 8, "int4": 4, "w4": 4}.get(recipe["name"])
ideal = params * (bits / 8 + (4 / 32 if bits == 4 else 0)) if bits else None  # int4: a float32 scale per 32
total = m["artifact"]["total_bytes"]
print(f"   wall {sum(build['stages_seconds'].values()) / 60:.1f} min (stages), peak "
      f"{build['peak_rss_bytes'] / 2**30:.2f} GiB; validation {m['validation']['status']}")
print("   per stage: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in build["stages_peak_rss_bytes"].items()) + " GiB")
if build.get("parts"):
    print("   parts: " + ", ".join(f"{k} {v['seconds']:.0f} s {v['peak_rss_bytes'] / 2**30:.2f} GiB"
                                  for k, v in build["parts"].items()))
print(f"   bytes {total:,}" + (f" = {total / ideal:.2f}x the ideal {ideal / 1e9:.2f} GB" if ideal else ""))
EOF
  folders+=("$folder")
done

for threads in 2 1; do
  echo "== bench, $threads thread(s)"
  "$RGEXPORT" bench "${folders[@]}" --no-eager --no-memory --no-hf --steps "$STEPS" --threads "$threads"
done
