#!/usr/bin/env python3
"""Where the time of one decode step goes, split by model component, in the artifact's own runtime.

    python scripts/profile_split.py ARTIFACT_DIR [--steps 16] [--threads 2] [--warmup 4] [--json]
                                   [--stat median|mean|min] [--details ops.json]

ARTIFACT_DIR is an rgexport artifact folder (manifest.json with "backend": "onnx" or "executorch").

- ONNX: one decode session (ORT_ENABLE_ALL, the state double-buffered in OrtValues bound once, as
  rgexport's runner does) with ONNX Runtime's profiler on; --warmup steps, then --steps profiled steps whose
  node kernel times are summed per component and per op type; then `end_profiling()` and --steps more steps
  timed without the profiler (the un-profiled median). ONNX Runtime names kernels after the *optimised*
  graph, so the session also saves that graph (weights to a scratch file, deleted afterwards) and each
  kernel is traced back to the exported graph through the tensors it writes. The exported node names carry
  no module paths (`node_MatMul_17_Q4`, `node_mul_10`), so components come from the graph's structure: the
  RMSNorms cut it into embedding / temporal block k / MLP k / head, and inside a temporal block the
  linears, the state outputs (`new_state.blocks.k.*`) and the data flow between them mark conv1d, RG-LRU,
  the attention core and the KV-cache write.
- ExecuTorch: the program is loaded twice, one after the other: without ETDump for the un-profiled median,
  then with ETDump (`load_program(..., enable_etdump=True)`), the etdump read back with
  `executorch.devtools.Inspector`. XNNPACK's per-operator events (`Fully Connected (NC, QDU8, F32, QB4W) GEMM
  #3`, ...) appear inside each DELEGATE_CALL when the runtime was built with XNNPACK profiling (the
  ExecuTorch 1.5.1 in rgexport's environment is). They carry XNNPACK operator names only (no debug handles or
  module paths, and rgexport writes no ETRecord), so components come from their order, which
  is the program's: the RMSNorm pattern (Square, Mean, ..., Reciprocal Square Root) cuts the sequence as
  for ONNX, and the fully-connected / batch-matmul / slice ops inside each block mark the parts. XNNPACK
  times operators in whole microseconds; what the DELEGATE_CALL took beyond its operators is reported as
  "delegate: unattributed". The state's copy back into the program's mutable buffers runs outside the
  delegate as portable `copy_` kernels ("state: copy-back into buffers"). Only the decode method is loaded
  (with XNNPACK's weight cache on, as rgexport's runner does). Where a runtime gives no per-operator events,
  the table lists each DELEGATE_CALL instead.

Both profilers add overhead; the un-profiled median step is printed beside the profiled one. Each row is the
sum over its operators of each operator's median time over the profiled steps (and, beside it, of its minimum:
the least each took, closest to what an unloaded machine gives); the runtime's own time outside the operators
is a row of its own, so the rows add up to the total, whose percentages they are. On a busy machine the
median step is longer than that sum: each step loses time to preemption in different operators.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# Rows, in the order printed.
COMPONENTS = [
    "embedding",
    "norms + residual adds",
    "recurrent: linears (x, y, out; gelu, gate)",
    "recurrent: conv1d",
    "recurrent: RG-LRU",
    "recurrent: unsplit",
    "attention: linears (q, k, v, o)",
    "attention: core (RoPE, scores, mask, softmax)",
    "attention: unsplit",
    "MLP",
    "head (+ soft-cap)",
    "state: conv1d shift",
    "state: KV-cache write",
    "state: copy-back into buffers",
    "other (inputs, positions)",
    "unmapped",
    "delegate: unattributed",
    "runtime overhead",
]
STATE_COPY_OPS = {"Slice", "Identity", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Copy"}
LINEAR_OPS = {"MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
              "QLinearMatMul", "QGemm", "FusedMatMul"}
NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "RMSNormalization", "SkipLayerNormalization"}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError):
        return None
    return None


def _stat(values: list[float], stat: str) -> float:
    if stat == "min":
        return min(values)
    return statistics.median(values) if stat == "median" else statistics.fmean(values)


def aggregate(items: list[tuple[str, str | None, list[float]]], stat: str,
              names: list[str] | None = None) -> dict[str, Any]:
    """items: (component, op type or None, ms in each profiled run). Each item's median (mean, min) over the
    runs, summed per component and per op type: medians keep one preempted run on a busy machine from
    inflating a row, and the rows still add up to the total printed."""
    comps: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "calls": 0})
    for c, op, ts in items:
        v = _stat(ts, stat)
        comps[c] += v
        if op is not None:
            ops[op]["ms"] += v
            ops[op]["calls"] += 1
    details = [{"op": n, "op_type": op, "component": c, "ms": round(_stat(ts, stat), 4)}
               for n, (c, op, ts) in zip(names or [], items, strict=False)]
    by_stat = {}
    for other in ("median", "mean", "min"):
        sums: dict[str, float] = defaultdict(float)
        for c, _, ts in items:
            sums[c] += _stat(ts, other)
        by_stat[other] = {c: round(v, 3) for c, v in sums.items()}
    return {"components_ms": dict(comps), "op_types": dict(ops), "step_total_ms": sum(comps.values()),
            "stat": stat, "components_ms_by_stat": by_stat, "details": details}


# ----------------------------------------------------------------------------------------------- ONNX


class OnnxGraph:
    """The exported decode graph (no weights loaded): nodes in export (= program) order, and who makes what."""

    def __init__(self, path: Path):
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        self.nodes = list(model.graph.node)
        self.initializers = {i.name: list(i.dims) for i in model.graph.initializer}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.producer: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for x in n.input:
                self.consumers[x].append(i)

    def is_linear(self, i: int) -> bool:
        n = self.nodes[i]
        if n.op_type == "MatMulNBits":
            return True
        return n.op_type in LINEAR_OPS and any(len(self.initializers.get(x, [])) == 2 for x in n.input)

    def bias_end(self, i: int) -> int:
        """The linear's bias Add where one follows it (its output plus an initializer), else the linear."""
        for c in self.consumers.get(self.nodes[i].output[0], []):
            n = self.nodes[c]
            if n.op_type == "Add" and any(x in self.initializers for x in n.input):
                return c
        return i

    def ancestors(self, starts: Iterable[int], within: set[int]) -> set[int]:
        seen: set[int] = set()
        todo = [s for s in starts if s in within]
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            for x in self.nodes[i].input:
                p = self.producer.get(x)
                if p is not None and p in within and p not in seen:
                    todo.append(p)
        return seen

    def descendants(self, tensors: Iterable[str]) -> set[int]:
        seen: set[int] = set()
        todo = [c for t in tensors for c in self.consumers.get(t, [])]
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            for o in self.nodes[i].output:
                todo.extend(c for c in self.consumers.get(o, []) if c not in seen)
        return seen


def classify_onnx(g: OnnxGraph, block_types: list[str]) -> tuple[dict[int, str], list[str]]:
    """Component of every exported node (index -> row name), and notes on what could not be split."""
    notes: list[str] = []
    comp: dict[int, str] = {}
    norms = [i for i, n in enumerate(g.nodes) if n.op_type in NORM_OPS]
    nb = len(block_types)
    if len(norms) != 2 * nb + 1:
        notes.append(f"found {len(norms)} norm nodes, expected {2 * nb + 1} for {nb} blocks: components not split")
        return {i: "unmapped" for i in range(len(g.nodes))}, notes
    norm_inputs = {g.nodes[i].input[0] for i in norms}
    for i in norms:
        comp[i] = "norms + residual adds"
    for i, n in enumerate(g.nodes):
        if n.op_type == "Add" and any(o in norm_inputs for o in n.output) and i > norms[0]:
            comp[i] = "norms + residual adds"

    token_side = g.descendants([x for x in g.graph_inputs if x in ("token", "tokens")])
    bounds = [-1, *norms, len(g.nodes)]
    for s in range(len(bounds) - 1):
        seg = [i for i in range(bounds[s] + 1, bounds[s + 1]) if i not in comp]
        segset = set(seg)
        if s == 0:  # before the first norm: the gather, its scale; position arithmetic
            for i in seg:
                comp[i] = "embedding" if i in token_side else "other (inputs, positions)"
        elif s == len(bounds) - 2:
            for i in seg:
                comp[i] = "head (+ soft-cap)"
        elif s % 2 == 0:  # after a block's second norm: its MLP
            for i in seg:
                comp[i] = "MLP"
        else:
            k = (s - 1) // 2
            outs = {o: i for i in seg for o in g.nodes[i].output if o.startswith(f"new_state.blocks.{k}.")}
            lin = [i for i in seg if g.is_linear(i)]
            if block_types[k] == "recurrent":
                ok = _split_recurrent(g, seg, lin, outs, comp)
            else:
                ok = _split_attention(g, seg, segset, lin, outs, comp)
            if not ok:
                notes.append(f"block {k} ({block_types[k]}): anchors not found, left unsplit")
                kind = "recurrent" if block_types[k] == "recurrent" else "attention"
                for i in seg:
                    comp[i] = f"{kind}: linears (x, y, out; gelu, gate)" if (kind == "recurrent" and i in lin) \
                        else ("attention: linears (q, k, v, o)" if i in lin else f"{kind}: unsplit")
    return comp, notes


def _split_recurrent(g: OnnxGraph, seg: list[int], lin: list[int], outs: dict[str, int], comp: dict[int, str]) -> bool:
    conv = [i for o, i in outs.items() if o.endswith(".conv1d")]
    lru = [i for o, i in outs.items() if o.endswith(".rg_lru")]
    if len(lin) != 3 or len(conv) != 1 or len(lru) != 1:
        return False
    p0, p1e, pc, pr, p2e = lin[0], g.bias_end(lin[1]), conv[0], lru[0], g.bias_end(lin[2])
    if not p0 < p1e < pc < pr < lin[2] <= p2e:
        return False
    for i in seg:
        if i < p0:
            c = "other (inputs, positions)"
        elif i <= p1e:
            c = "recurrent: linears (x, y, out; gelu, gate)"
        elif i < pc:
            c = "recurrent: conv1d"
        elif i == pc:
            c = "state: conv1d shift" if g.nodes[i].op_type in STATE_COPY_OPS else "recurrent: conv1d"
        elif i <= pr:
            c = "recurrent: RG-LRU"
        elif i <= p2e:
            c = "recurrent: linears (x, y, out; gelu, gate)"
        else:
            c = "other (inputs, positions)"
        comp[i] = c
    return True


def _split_attention(g: OnnxGraph, seg: list[int], segset: set[int], lin: list[int], outs: dict[str, int],
                     comp: dict[int, str]) -> bool:
    kv = [i for o, i in outs.items() if o.endswith((".keys", ".values"))]
    if len(lin) != 4 or not kv:
        return False
    linears = {i for x in lin for i in (x, g.bias_end(x))}
    o_input = g.producer.get(g.nodes[lin[3]].input[0])
    core_side = g.ancestors([o_input] if o_input is not None else [], segset)
    write = g.ancestors(kv, segset) - core_side
    for i in seg:
        if i in linears:
            comp[i] = "attention: linears (q, k, v, o)"
        elif i in write:
            comp[i] = "state: KV-cache write"
        elif i > g.bias_end(lin[3]):
            comp[i] = "other (inputs, positions)"
        else:
            comp[i] = "attention: core (RoPE, scores, mask, softmax)"
    return True


def map_optimized(opt_path: Path, g: OnnxGraph, comp: dict[int, str]) -> dict[str, str]:
    """Optimised node name -> component: through the tensors it writes (fusions keep the fused tail's
    output names), else its name's prefix before '/', else the tensors it reads."""
    import onnx

    opt = onnx.load(str(opt_path), load_external_data=False)
    by_name = {n.name: i for i, n in enumerate(g.nodes)}
    out: dict[str, str] = {}
    for n in opt.graph.node:
        found = next((g.producer[o] for o in n.output if o in g.producer), None)
        if found is None:
            found = by_name.get(n.name.split("/")[0])
        if found is None:
            found = next((g.producer[x] for x in n.input if x in g.producer), None)
        out[n.name] = comp.get(found, "unmapped") if found is not None else "unmapped"
    return out


def profile_onnx(folder: Path, manifest: dict[str, Any], steps: int, warmup: int, threads: int,
                 scratch: Path, stat: str) -> dict[str, Any]:
    import onnxruntime as ort

    files = manifest.get("backend_facts", {}).get("onnx_files", {})
    decode = folder / files.get("decode", manifest["artifact"]["file"])
    block_types = manifest["model"]["config"]["block_types"]
    graph = OnnxGraph(decode)
    comp, notes = classify_onnx(graph, block_types)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / "ort_profile")
    opt_path = scratch / "decode.optimized.onnx"
    options.optimized_model_filepath = str(opt_path)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     "decode.optimized.bin")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3  # the "hardware specific optimizations" warning of saving the graph
    t = time.monotonic()
    session = ort.InferenceSession(str(decode), options, providers=["CPUExecutionProvider"])
    load_s = time.monotonic() - t
    names = map_optimized(opt_path, graph, comp)
    for f in (opt_path, scratch / "decode.optimized.bin"):
        f.unlink(missing_ok=True)

    def buffer(shape: list[int], dtype: type) -> Any:
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0)
        value.update_inplace(np.zeros(shape, dtype))
        return value

    state_in = [i for i in session.get_inputs() if i.name.startswith("state.")]
    states = [[buffer(list(i.shape), np.float32) for i in state_in] for _ in range(2)]
    token, position = buffer([1], np.int32), buffer([1], np.int32)
    logits_shape = list(next(o for o in session.get_outputs() if o.name == "logits").shape)
    logits = buffer(logits_shape, np.float32)
    bindings = []
    for parity in (0, 1):
        b = session.io_binding()
        b.bind_ortvalue_input("token", token)
        b.bind_ortvalue_input("position", position)
        b.bind_ortvalue_output("logits", logits)
        for i, src, dst in zip(state_in, states[parity], states[1 - parity], strict=True):
            b.bind_ortvalue_input(i.name, src)
            b.bind_ortvalue_output("new_" + i.name, dst)
        bindings.append(b)
    token_id = int(manifest.get("tokenizer", {}).get("bos_id", 2))
    pos = 0

    def step() -> float:
        nonlocal pos, token_id
        token.update_inplace(np.array([token_id], np.int32))
        position.update_inplace(np.array([pos], np.int32))
        t0 = time.perf_counter()
        session.run_with_iobinding(bindings[pos % 2])
        dt = time.perf_counter() - t0
        token_id = int(np.argmax(logits.numpy().reshape(-1)))  # feed the model's own next token
        pos += 1
        return dt * 1e3

    for _ in range(warmup):
        step()
    profiled_wall = [step() for _ in range(steps)]
    profile_path = Path(session.end_profiling())
    for _ in range(max(2, warmup // 2)):
        step()
    unprofiled = [step() for _ in range(steps)]

    events = json.loads(profile_path.read_text())
    profile_path.unlink(missing_ok=True)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs = runs[-steps:]
    nodes: dict[str, list[float]] = {}
    node_op: dict[str, str] = {}
    starts = [r[0] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        r = bisect.bisect_right(starts, e["ts"]) - 1
        if r < 0 or e["ts"] > runs[r][1]:
            continue
        node = e["name"].removesuffix("_kernel_time")
        nodes.setdefault(node, [0.0] * len(runs))[r] += e["dur"] / 1e3
        node_op[node] = e.get("args", {}).get("op_name", "?")
    run_ms = [(b - a) / 1e3 for a, b in runs]
    kernels = [sum(t[r] for t in nodes.values()) for r in range(len(runs))]
    items = [(names.get(n, "unmapped"), node_op[n], t) for n, t in nodes.items()]
    items.append(("runtime overhead", None, [a - b for a, b in zip(run_ms, kernels, strict=True)]))
    agg = aggregate(items, stat, [*nodes, "(model_run minus kernels)"])
    unmapped_nodes = sorted(n for n, c in names.items() if c == "unmapped")
    if unmapped_nodes:
        notes.append(f"{len(unmapped_nodes)} optimised nodes not traced to the exported graph: {unmapped_nodes[:8]}")
    notes.append("runtime overhead = ORT's model_run minus the sum of its node kernel times (executor, binding)")
    return {
        "runtime": f"onnxruntime {ort.__version__}",
        "profiler": "onnxruntime SessionOptions.enable_profiling (per-node kernel times)",
        "load_s": round(load_s, 1),
        "steps_profiled": len(runs),
        "profiled_step_ms_median": statistics.median(run_ms),
        "profiled_step_wall_ms_median": statistics.median(profiled_wall),
        "unprofiled_step_ms_median": statistics.median(unprofiled),
        "unprofiled_step_ms_min": min(unprofiled),
        **agg,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ ExecuTorch

XNN_NUMBER = re.compile(r" #\d+$")


def xnn_kind(name: str) -> str:
    return XNN_NUMBER.sub("", name)


def classify_xnn_sequence(ops: list[tuple[str, str]], block_types: list[str]) -> tuple[list[str], list[str]]:
    """Component of each op of one decode in execution order. `ops`: (kind, name) with kind 'native' or
    'xnnpack'. XNNPACK names only say the operator (`Multiply (ND) #12`), so this reads the program order."""
    notes: list[str] = []
    kinds = [xnn_kind(n) if k == "xnnpack" else n for k, n in ops]
    comp = ["unmapped"] * len(ops)
    nb = len(block_types)
    # Norm anchors: Square, then Mean within a few ops (RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + scale)).
    squares = [i for i, k in enumerate(kinds)
               if k.startswith("Square (") and any(x.startswith("Mean") for x in kinds[i + 1:i + 5])]
    for i, (kind, name) in enumerate(ops):
        if kind == "native":
            if "embedding" in name:
                comp[i] = "embedding"
            elif name.startswith("native_call_copy_"):
                comp[i] = "state: copy-back into buffers"
            else:
                comp[i] = "other (inputs, positions)"
    if len(squares) != 2 * nb + 1:
        notes.append(f"found {len(squares)} RMSNorm patterns, expected {2 * nb + 1}: XNNPACK ops not split")
        return comp, notes
    norm_spans = []
    for s in squares:
        j = next((j for j in range(s, min(s + 12, len(kinds))) if kinds[j].startswith("Reciprocal Square Root")), s)
        for _ in range(2):  # x * rsqrt(...), then * (1 + scale)
            if j + 1 < len(kinds) and kinds[j + 1].startswith("Multiply"):
                j += 1
        norm_spans.append((s, j))
    xnn = [i for i, (k, _) in enumerate(ops) if k == "xnnpack"]
    for n, (s, e) in enumerate(norm_spans):
        for i in range(s, e + 1):
            comp[i] = "norms + residual adds"
        if n > 0 and s > 0 and kinds[s - 1].startswith("Add"):
            comp[s - 1] = "norms + residual adds"
    first = norm_spans[0][0]
    for i in xnn:
        if i < first and comp[i] == "unmapped":
            comp[i] = "embedding" if kinds[i].startswith("Multiply") and i == first - 1 else "other (inputs, positions)"
    bounds = [s for s, _ in norm_spans]
    ends = [e for _, e in norm_spans]
    for b in range(2 * nb + 1):
        lo = ends[b] + 1
        hi = bounds[b + 1] if b + 1 < len(bounds) else (max(xnn) + 1 if xnn else lo)
        seg = [i for i in range(lo, hi) if ops[i][0] == "xnnpack" and comp[i] == "unmapped"]
        if b == 2 * nb:
            for i in seg:
                comp[i] = "head (+ soft-cap)"
        elif b % 2 == 1:
            for i in seg:
                comp[i] = "MLP"
        else:
            k = b // 2
            ok = (_xnn_recurrent if block_types[k] == "recurrent" else _xnn_attention)(seg, kinds, comp)
            if not ok:
                notes.append(f"block {k} ({block_types[k]}): XNNPACK anchors not found, left unsplit")
                kind = "recurrent" if block_types[k] == "recurrent" else "attention"
                for i in seg:
                    comp[i] = f"{kind}: unsplit"
    return comp, notes


def _xnn_recurrent(seg: list[int], kinds: list[str], comp: list[str]) -> bool:
    fc = [i for i in seg if kinds[i].startswith("Fully Connected")]
    bmm = [i for i in seg if kinds[i].startswith("Batch Matrix Multiply")]
    if len(fc) != 3 or not bmm or not fc[1] < bmm[0] < fc[2]:
        return False
    slices = [i for i in seg if fc[1] < i < bmm[0] and kinds[i].startswith("Slice")]
    shift = slices[-1] if slices else None
    gate = fc[2] - 1 if kinds[fc[2] - 1].startswith("Multiply") else None
    for i in seg:
        if i < fc[0]:
            c = "other (inputs, positions)"
        elif i <= fc[1] or i == gate or i == fc[2]:
            c = "recurrent: linears (x, y, out; gelu, gate)"
        elif i == shift:
            c = "state: conv1d shift"
        elif shift is not None and i < shift:
            c = "recurrent: conv1d"
        elif i < fc[2]:
            c = "recurrent: RG-LRU"
        else:
            c = "other (inputs, positions)"
        comp[i] = c
    return True


def _xnn_attention(seg: list[int], kinds: list[str], comp: list[str]) -> bool:
    fc = [i for i in seg if kinds[i].startswith("Fully Connected")]
    bmm = [i for i in seg if kinds[i].startswith("Batch Matrix Multiply")]
    if len(fc) != 4 or len(bmm) < 4 or not bmm[3] < fc[3]:
        return False
    # Scores over the cache and over the chunk, then probabilities x values over each (four batch matmuls),
    # their sum and its reshapes; what follows, up to the output projection, is the ring-buffer write
    # (rgexport.model.blocks: RingBuffer runs before proj_final).
    layout = ("Static Reshape", "Transpose", "Copy")
    w = bmm[3] + 1
    while w < fc[3] and kinds[w].startswith(layout):
        w += 1
    if w < fc[3] and kinds[w].startswith("Add"):
        w += 1
    while w < fc[3] and kinds[w].startswith(layout):
        w += 1
    for i in seg:
        if i in fc:
            c = "attention: linears (q, k, v, o)"
        elif i < fc[0] or i > fc[3]:
            c = "other (inputs, positions)"
        elif i >= w:
            c = "state: KV-cache write"
        else:
            c = "attention: core (RoPE, scores, mask, softmax)"
        comp[i] = c
    return True


def profile_executorch(folder: Path, manifest: dict[str, Any], steps: int, warmup: int, threads: int,
                       scratch: Path, stat: str) -> dict[str, Any]:
    import torch

    facts = manifest.get("backend_facts", {})
    if facts.get("quantized_ops"):
        import executorch.kernels.quantized  # noqa: F401 - registers quantized_decomposed kernels
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    from rgexport.backends.executorch.runner import share_packed_weights

    portable_lib._unsafe_reset_threadpool(int(threads))  # experimental in 1.5.1; what rgexport's loader calls
    weight_cache = share_packed_weights()
    pte = folder / manifest["artifact"]["file"]
    data = folder / facts["data_file"] if facts.get("data_file") else None
    block_types = manifest["model"]["config"]["block_types"]
    bos = int(manifest.get("tokenizer", {}).get("bos_id", 2))

    def run(method: Any, n: int, start: int, token: int) -> tuple[list[float], int, int]:
        times = []
        for p in range(start, start + n):
            t0 = time.perf_counter()
            out = method.execute([torch.tensor([[token]], dtype=torch.int32), torch.tensor([p], dtype=torch.int32)])
            times.append((time.perf_counter() - t0) * 1e3)
            token = int(out[0].reshape(-1).argmax())
        return times, start + n, token

    # 1. Un-profiled: a program without an event tracer (no ETDump, so XNNPACK does not time its operators).
    t = time.monotonic()
    program = Runtime.get().load_program(pte, data_path=data)
    method = program.load_method("decode")  # only decode: its state starts at zeros
    load_s = time.monotonic() - t
    _, pos, tok = run(method, warmup, 0, bos)
    unprofiled, _, _ = run(method, steps, pos, tok)
    del method, program
    gc.collect()

    # 2. Profiled: ETDump on.
    program = Runtime.get().load_program(pte, data_path=data, enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("decode")
    _, pos, tok = run(method, warmup, 0, bos)
    profiled_wall, _, _ = run(method, steps, pos, tok)
    etdump = scratch / "decode.etdp"
    program.write_etdump_result_to_file(str(etdump), str(scratch / "decode.debug.bin"))
    del method, program
    gc.collect()

    import warnings

    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Output Buffer not found": no debug buffer, timings only
        inspector = Inspector(etdump_path=str(etdump))
    for f in (etdump, scratch / "decode.debug.bin"):
        f.unlink(missing_ok=True)
    blocks = [b for b in inspector.event_blocks if b.name == "Execute"]
    block = max(blocks, key=lambda b: max((len(e.perf_data.raw) for e in b.events if e.perf_data), default=0))
    nruns = max(len(e.perf_data.raw) for e in block.events if e.perf_data)
    use = min(steps, nruns)

    def last(e: Any) -> list[float]:
        return list(e.perf_data.raw[-use:]) if e.perf_data else [0.0] * use

    ops: list[tuple[str, str]] = []
    times: list[list[float]] = []
    delegate_calls: list[list[float]] = []
    delegate_ops: list[list[float]] = []  # per delegate call: its XNNPACK operators' time per run
    method_ms: list[float] = [0.0] * use
    pending_native = None
    inside = [0.0] * use
    for e in block.events:
        name = e.name or ""
        if e.delegate_debug_identifier is not None or e.is_delegated_op:
            ops.append(("xnnpack", str(e.delegate_debug_identifier or name)))
            times.append(last(e))
            inside = [a + b for a, b in zip(inside, last(e), strict=True)]
        elif name.startswith("native_call_"):
            pending_native = name
        elif name == "OPERATOR_CALL":
            ops.append(("native", pending_native or "OPERATOR_CALL"))
            times.append(last(e))
            pending_native = None
        elif name == "DELEGATE_CALL":
            delegate_calls.append(last(e))
            delegate_ops.append(inside)
            inside = [0.0] * use
        elif name == "Method::execute":
            method_ms = last(e)
    comp, notes = classify_xnn_sequence(ops, block_types)
    items: list[tuple[str, str | None, list[float]]] = []
    for (kind, name), c, ts in zip(ops, comp, times, strict=True):
        key = xnn_kind(name) if kind == "xnnpack" else name.removeprefix("native_call_") + " (portable kernel)"
        items.append((c, key, ts))
    n_xnn = sum(1 for k, _ in ops if k == "xnnpack")
    for n, (dc, inner) in enumerate(zip(delegate_calls, delegate_ops, strict=True)):
        items.append(("delegate: unattributed", None if n_xnn else f"DELEGATE_CALL #{n}",
                      [a - b for a, b in zip(dc, inner, strict=True)]))
    if not n_xnn:
        notes.append("no XNNPACK per-operator events (runtime built without XNNPACK profiling): only whole "
                     "DELEGATE_CALLs, listed in order below")
    native = [sum(ts[r] for (k, _), ts in zip(ops, times, strict=True) if k == "native") for r in range(use)]
    items.append(("runtime overhead", None,
                  [method_ms[r] - sum(d[r] for d in delegate_calls) - native[r] for r in range(use)]))
    agg = aggregate(items, stat, [n for _, n in ops])
    notes.append("delegate: unattributed = DELEGATE_CALL time minus its XNNPACK operators' times (XNNPACK reports "
                 "whole microseconds per operator; the rest is its runtime between operators)")
    notes.append("runtime overhead = Method::execute minus DELEGATE_CALLs and portable-kernel OPERATOR_CALLs")
    if not weight_cache:
        notes.append("XNNPACK weight cache could not be turned on (rgexport's runner turns it on)")
    return {
        "runtime": f"executorch {_version('executorch')}",
        "profiler": "ETDump (enable_etdump=True) read with executorch.devtools.Inspector",
        "load_s": round(load_s, 1),
        "steps_profiled": use,
        "profiled_step_ms_median": statistics.median(method_ms),
        "profiled_step_wall_ms_median": statistics.median(profiled_wall),
        "unprofiled_step_ms_median": statistics.median(unprofiled),
        "unprofiled_step_ms_min": min(unprofiled),
        **agg,
        "delegate_calls_ms": [_stat(d, stat) for d in delegate_calls],
        "xnnpack_ops_per_step": n_xnn,
        "notes": notes,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------------------------- report


def markdown(r: dict[str, Any], top: int) -> str:
    total = r["step_total_ms"]
    lines = [
        f"## {r['artifact']} ({r['backend']}, {r['recipe']}), {r['threads']} thread(s)",
        "",
        f"- runtime: {r['runtime']}; profiler: {r['profiler']}",
        f"- load average (1/5/15 min) before / after: {r['loadavg_before']} / {r['loadavg_after']}; "
        f"peak RSS {r['peak_rss_gib']} GiB",
        f"- un-profiled decode step: median {r['unprofiled_step_ms_median']:.1f} ms "
        f"(min {r['unprofiled_step_ms_min']:.1f}) over {r['steps']} steps after {r['warmup']} warm-up",
        f"- profiled step (the runtime's own per-run event): median {r['profiled_step_ms_median']:.1f} ms over "
        f"{r['steps_profiled']} steps, {100 * (r['profiled_step_ms_median'] / r['unprofiled_step_ms_median'] - 1):+.0f}"
        f" % over un-profiled; rows: each operator's {r['stat']} (and min) over those steps, summed per row",
        "",
        f"| component | ms / step ({r['stat']}) | % | ms / step (min) | % (min) |",
        "|---|---:|---:|---:|---:|",
    ]
    mins = r["components_ms_by_stat"]["min"]
    total_min = sum(mins.values())
    for c in [*COMPONENTS, *sorted(set(r["components_ms"]) - set(COMPONENTS))]:
        ms = r["components_ms"].get(c)
        if ms is None or (abs(ms) < 0.005 and c in ("unmapped", "recurrent: unsplit", "attention: unsplit")):
            continue
        m = mins.get(c, 0.0)
        lines.append(f"| {c} | {ms:.2f} | {100 * ms / total:.1f} | {m:.2f} | {100 * m / total_min:.1f} |")
    lines.append(f"| **total** | **{total:.2f}** | 100.0 | **{total_min:.2f}** | 100.0 |")
    lines += ["", "| op type | ms / step | % | calls / step |", "|---|---:|---:|---:|"]
    ops = sorted(r["op_types"].items(), key=lambda kv: -kv[1]["ms"])
    for op, v in ops[:top]:
        lines.append(f"| {op} | {v['ms']:.2f} | {100 * v['ms'] / total:.1f} | {v['calls']:g} |")
    if len(ops) > top:
        rest = sum(v["ms"] for _, v in ops[top:])
        lines.append(f"| ({len(ops) - top} more types) | {rest:.2f} | {100 * rest / total:.1f} | |")
    if r.get("delegate_calls_ms") is not None:
        lines += ["", "Delegate calls per step, in order: "
                  + ", ".join(f"#{i} {ms:.2f} ms" for i, ms in enumerate(r["delegate_calls_ms"]))
                  + f"; XNNPACK operator events per step: {r['xnnpack_ops_per_step']}"]
    lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="rgexport artifact folder (manifest.json)")
    ap.add_argument("--steps", type=int, default=16, help="profiled (and un-profiled) decode steps")
    ap.add_argument("--warmup", type=int, default=4, help="decode steps before each measured run")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (ORT) / XNNPACK thread pool size")
    ap.add_argument("--top", type=int, default=12, help="op types listed")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="where the profiler's files go while read (default: a temporary folder, removed)")
    ap.add_argument("--stat", choices=("median", "mean", "min"), default="median",
                    help="per operator over the profiled steps, then summed per row (default: median; min: the "
                         "least each operator took, closest to an unloaded machine; the JSON has all three)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    ap.add_argument("--details", type=Path, default=None,
                    help="write every operator's row (name, op type, component, ms) to this JSON file")
    a = ap.parse_args(argv)
    manifest = json.loads((a.artifact / "manifest.json").read_text())
    backend = manifest.get("backend")
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="profile_split_", dir=a.scratch) as d:
        if backend == "onnx":
            r = profile_onnx(a.artifact, manifest, a.steps, a.warmup, a.threads, Path(d), a.stat)
        elif backend == "executorch":
            r = profile_executorch(a.artifact, manifest, a.steps, a.warmup, a.threads, Path(d), a.stat)
        else:
            print(f"backend {backend!r}: only onnx and executorch artifacts are profiled", file=sys.stderr)
            return 2
    r.update(artifact=str(a.artifact), backend=backend, recipe=manifest.get("recipe", {}).get("name"),
             threads=a.threads, steps=a.steps, warmup=a.warmup, loadavg_before=before, loadavg_after=loadavg(),
             peak_rss_gib=rss_gib(), parameters=manifest.get("model", {}).get("parameters"))
    details = r.pop("details", [])
    if a.details:
        a.details.write_text(json.dumps(details, indent=0))
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(markdown(r, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
