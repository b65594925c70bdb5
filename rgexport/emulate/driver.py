"""Running an artifact on the emulated device and judging it: device_runner.py under qemu and natively, the
reference on this machine, and the comparison of the Arm run with the x86 one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.emulate.environment import DEFAULT_CPU, DEVICE, ArmEnvironment, _Steps, ensure_environment
from rgexport.errors import RgexportError

RUNNER_SCRIPT = Path(__file__).with_name("device_runner.py")  # the device side: stdlib, numpy and the runtime only


def runtime_args() -> list[str]:
    """device_runner.py's table of runtimes: `--runtime BACKEND=PATH` for each backend's device module
    (`Backend.device_module`, through the registry), so the device side dispatches by table."""
    from rgexport.backends import device_modules

    return [a for name, path in device_modules().items() for a in ("--runtime", f"{name}={path}")]


# Running -----------------------------------------------------------------------------------------
def _run_runner(cmd: list[str], env: dict[str, str] | None, out: Path, advance: Callable[[int], None] | None,
                timeout: float | None, what: str) -> dict[str, np.ndarray]:
    """Runs device_runner.py (argv `cmd`, writing `out`), passing its progress lines to `advance`."""
    start = time.monotonic()
    stderr_file = tempfile.TemporaryFile(mode="w+")
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=stderr_file, text=True) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.startswith("@progress ") and advance:
                    advance(int(line.split()[1]))
                if timeout is not None and time.monotonic() - start > timeout:
                    proc.kill()
                    raise RgexportError(f"{what} took longer than {timeout:.0f} s; use fewer --tokens")
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    stderr_file.seek(0)
    errors = stderr_file.read()
    stderr_file.close()
    if proc.returncode != 0 or not out.is_file():
        signal = " (killed by a signal: a crash in the runtime)" if proc.returncode < 0 else ""
        raise RgexportError(f"{what} failed with exit status {proc.returncode}{signal}:\n"
                            + "\n".join(errors.strip().splitlines()[-15:]))
    with np.load(out) as z:
        return {k: z[k] for k in z.files}

def run_on_device(env: ArmEnvironment, artifact_dir: Path, tokens: Sequence[int], *, threads: int = 1,
                  greedy: int = 0, ort_format: bool = False, advance: Callable[[int], None] | None = None,
                  timeout: float | None = None) -> dict[str, np.ndarray]:
    """device_runner.py on the emulated aarch64 device -> its outputs (logits, state.*, greedy, info)."""
    with tempfile.TemporaryDirectory(prefix="rgexport-arm-") as tmp:
        tok, out = Path(tmp) / "tokens.npy", Path(tmp) / "out.npz"
        np.save(tok, np.asarray(tokens, np.int64))
        args = [RUNNER_SCRIPT, Path(artifact_dir).resolve(), tok, out, "--threads", threads, "--greedy", greedy,
                "--progress", *runtime_args()] + (["--ort-format"] if ort_format else [])
        return _run_runner(env.command(args), env.env(threads), out, advance, timeout,
                           f"The artifact on emulated {env.cpu}")

def run_native(artifact_dir: Path, tokens: Sequence[int], *, threads: int = 1, greedy: int = 0,
               ort_format: bool = False, advance: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """The same device_runner.py on this machine, with this Python and its runtimes."""
    with tempfile.TemporaryDirectory(prefix="rgexport-host-") as tmp:
        tok, out = Path(tmp) / "tokens.npy", Path(tmp) / "out.npz"
        np.save(tok, np.asarray(tokens, np.int64))
        cmd = [sys.executable, str(RUNNER_SCRIPT), str(Path(artifact_dir).resolve()), str(tok), str(out),
               "--threads", str(threads), "--greedy", str(greedy), "--progress", *runtime_args()]
        cmd += ["--ort-format"] if ort_format else []
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="2")
        return _run_runner(cmd, env, out, advance, None, f"The artifact on this machine ({platform.machine()})")

def info_of(result: dict[str, np.ndarray]) -> dict[str, Any]:
    return json.loads(str(result["info"]))

def states_of(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("state."): v for k, v in result.items() if k.startswith("state.")}

def compare_runs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far run `a` (Arm) is from run `b` (x86) of the same artifact on the same tokens."""
    la, lb = a["logits"].astype(np.float64), b["logits"].astype(np.float64)
    diff = np.abs(la - lb)
    per_position = diff.max(axis=-1)
    sa, sb = states_of(a), states_of(b)
    state = {k: float(np.abs(sa[k].astype(np.float64) - sb[k]).max()) for k in sa if k in sb}
    out = {
        "max_abs_logit_difference": float(diff.max()),
        "mean_abs_logit_difference": float(diff.mean()),
        "bitwise_identical": bool(np.array_equal(a["logits"], b["logits"])),
        "positions_differing": int((per_position > 0).sum()),
        "first_position_differing": int(np.argmax(per_position > 0)) if (per_position > 0).any() else None,
        "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
        "max_abs_state_difference": max(state.values()) if state else None,
    }
    if "greedy" in a and "greedy" in b:
        div = np.nonzero(a["greedy"] != b["greedy"])[0]
        out["greedy_first_divergence"] = int(div[0]) if len(div) else None
    return out

# Validation --------------------------------------------------------------------------------------
@dataclasses.dataclass
class EmulatedValidation:
    """The Arm run judged against the reference (`report`), and how it differs from the x86 run."""

    report: Any  # rgexport.validate.ValidationReport, for the emulated Arm run
    device: dict[str, Any]
    arm_vs_x86: dict[str, Any] | None
    x86_metrics: dict[str, Any] | None  # the native run against the same reference, for comparison
    timings: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.report.passed

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict() | {
            "device": self.device,
            "arm_vs_x86": self.arm_vs_x86,
            "x86_metrics": self.x86_metrics,
            "timings": self.timings,
        }

def _reference(folder: Path, manifest: dict[str, Any], checkpoint: str | None, preset: str | None):
    """The checkpoint the artifact was built from, as `rgexport.validate.validate_artifact` finds it."""
    from rgexport.validate import artifact_checkpoint

    return artifact_checkpoint(manifest, checkpoint, preset)

def judge_run(run: dict[str, np.ndarray], reference_logits: np.ndarray, reference_state: dict[str, np.ndarray],
              reference_greedy: list[int] | None, targets: np.ndarray, window: int, *, backend: str, recipe: str,
              quantized: bool, greedy_tokens: int):
    """A ValidationReport for one device run, with the metrics and thresholds of `rgexport validate`."""
    from rgexport.logits import compare_logits
    from rgexport.validate import ValidationReport, judge, load_thresholds

    metrics = compare_logits(reference_logits, run["logits"], targets)
    per_pos = metrics["_per_position_max_error"]
    metrics["max_abs_logit_error_first_window"] = float(per_pos[:window].max())
    metrics["max_abs_logit_error_after_window"] = float(per_pos[window:].max()) if len(per_pos) > window else None
    states = states_of(run)
    state_errors = None
    if states:
        state_errors = {}
        for name, ref in reference_state.items():
            if name in states:
                state_errors[name] = float(np.abs(states[name].astype(np.float64).reshape(ref.shape) - ref).max())
    divergence = None
    if reference_greedy is not None and "greedy" in run:
        div = [i for i, (x, y) in enumerate(zip(reference_greedy, run["greedy"].tolist())) if x != y]
        divergence = div[0] if div else None
    thresholds = load_thresholds(recipe, quantized, backend)
    failures = judge(metrics, thresholds)
    notes = [f"greedy outputs diverge at step {divergence} of {greedy_tokens}"] if divergence is not None else []
    return ValidationReport(backend, recipe, len(targets), metrics, thresholds, failures, state_errors,
                            greedy_tokens if reference_greedy is not None else 0, divergence, notes)

def validate_emulated(
    path: str | Path, *, checkpoint: str | None = None, preset: str | None = None, tokens: int | None = None,
    text: Path | None = None, greedy_tokens: int = 64, cpu: str = DEFAULT_CPU, threads: int = 1,
    compare_x86: bool = True, ort_format: bool = False, stages: Any | None = None, timeout: float | None = None,
) -> EmulatedValidation:
    """Validates an artifact folder on the emulated aarch64 device (see the module docstring).

    Same tokens, metrics and thresholds as `rgexport.validate.validate_artifact`; `compare_x86` also runs
    the artifact natively with the same driver and reports the Arm-vs-x86 differences.
    """
    import torch

    from rgexport.runtime import checked_artifact
    from rgexport.validate import EagerRunner, artifact_tokenizer, greedy, heldout_tokens, teacher_forced

    steps = _Steps(stages)
    folder, manifest = checked_artifact(path)  # paths, checksums, the backend's structural check
    backend, recipe = manifest["backend"], manifest["recipe"]
    setup_start = time.perf_counter()
    env = ensure_environment(backend, cpu, stages)
    setup_seconds = time.perf_counter() - setup_start

    with steps.stage("reference", "checkpoint and fp32 step model"):
        ckpt = _reference(folder, manifest, checkpoint, preset)
        tokenizer = artifact_tokenizer(folder, manifest, ckpt)
        n = tokens or 4 * ckpt.config.attention_window_size
        ids = heldout_tokens(tokenizer, n, text)
        inputs, targets = list(ids[:-1]), np.asarray(ids[1:])
        chunk = int(manifest["io"]["prefill_chunk"])
        torch_threads = torch.get_num_threads()
        # One thread: the step model's ops are small, and on a shared machine two spinning intra-op
        # threads made it ~10x slower (1.07 s vs 0.11 s per token on 2 busy cores).
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                reference = EagerRunner(ckpt.model, chunk)
                ref_logits = teacher_forced(reference, inputs)
                ref_state = reference.state()
                ref_greedy = greedy(reference, inputs[:chunk], greedy_tokens) if greedy_tokens else None
        finally:
            torch.set_num_threads(torch_threads)

    total = n + greedy_tokens
    runtime = ", ".join(f"{k} {v}" for k, v in env.runtime.items() if k != "numpy")
    with steps.stage("emulated run", f"{n} + {greedy_tokens} greedy tokens, -cpu {env.cpu}, {runtime} aarch64"):
        start = time.perf_counter()
        with steps.bar(f"{DEVICE}", total) as advance:
            arm = run_on_device(env, folder, inputs, threads=threads, greedy=greedy_tokens, ort_format=ort_format,
                                advance=advance, timeout=timeout)
        arm_seconds = time.perf_counter() - start
    native = None
    if compare_x86:
        with steps.stage("native run", f"the same on this machine ({platform.machine()})"):
            start = time.perf_counter()
            native = run_native(folder, inputs, threads=threads, greedy=greedy_tokens, ort_format=ort_format)
            native_seconds = time.perf_counter() - start

    window = ckpt.config.attention_window_size
    common = dict(backend=backend, recipe=recipe["name"], quantized=recipe["quantized"], greedy_tokens=greedy_tokens)
    report = judge_run(arm, ref_logits, ref_state, ref_greedy, targets, window, **common)
    arm_info = info_of(arm)
    report.notes[:0] = [f"ran on {DEVICE}: {env.qemu_version}, -cpu {env.cpu}, Python {arm_info['python']} "
                        f"aarch64, {arm_info['runtime']} {arm_info['runtime_version']}", *env.notes]
    x86_metrics = arm_vs_x86 = None
    timings: dict[str, Any] = {
        "setup_seconds": round(setup_seconds, 2),
        "arm_run_seconds": round(arm_seconds, 2),
        "arm_load_seconds": round(arm_info["load_seconds"], 3),
        "arm_decode_ms_per_token": _ms(arm_info["decode_seconds_per_token"]),
        "arm_decode_cpu_ms_per_token": _ms(arm_info.get("decode_cpu_seconds_per_token")),
    }
    if native is not None:
        x86_report = judge_run(native, ref_logits, ref_state, ref_greedy, targets, window, **common)
        x86_metrics = {k: v for k, v in x86_report.metrics.items() if not k.startswith("_")}
        x86_metrics["passed"] = x86_report.passed
        arm_vs_x86 = compare_runs(arm, native)
        native_info = info_of(native)
        timings |= {
            "x86_run_seconds": round(native_seconds, 2),
            "x86_decode_ms_per_token": _ms(native_info["decode_seconds_per_token"]),
            "x86_decode_cpu_ms_per_token": _ms(native_info.get("decode_cpu_seconds_per_token")),
        }
        # CPU time per token: wall time on a shared machine mostly measures the other processes.
        arm_ms, x86_ms = timings["arm_decode_cpu_ms_per_token"], timings["x86_decode_cpu_ms_per_token"]
        if arm_ms and x86_ms:
            timings["emulation_slowdown"] = round(arm_ms / x86_ms, 1)
        if not arm_vs_x86["bitwise_identical"]:
            report.notes.append(
                f"Arm and x86 logits differ: max |diff| {arm_vs_x86['max_abs_logit_difference']:.3g} at "
                f"{arm_vs_x86['positions_differing']} of {n} positions (top-1 agreement "
                f"{100 * arm_vs_x86['top1_agreement']:.2f}%)"
            )
    return EmulatedValidation(report, env.describe(), arm_vs_x86, x86_metrics, timings)

def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds else None

def format_emulated(result: EmulatedValidation) -> str:
    """The host report's lines, then the device and the Arm-vs-x86 comparison."""
    from rgexport.validate import format_report

    d, t = result.device, result.timings
    lines = [format_report(result.report).replace(" over ", f" on {DEVICE} over ", 1)]
    lines.append(f"  device      {d['qemu']}, -cpu {d['cpu']}, Python {d['python']}, "
                 + ", ".join(f"{k} {v}" for k, v in d["runtime"].items()))
    c = result.arm_vs_x86
    if c is not None:
        if c["bitwise_identical"]:
            lines.append("  arm vs x86  logits bitwise identical")
        else:
            lines.append(f"  arm vs x86  max |diff| {c['max_abs_logit_difference']:.3g}  mean |diff| "
                         f"{c['mean_abs_logit_difference']:.3g}  at {c['positions_differing']} positions "
                         f"(first {c['first_position_differing']}), top-1 agreement {100 * c['top1_agreement']:.2f}%")
        x = result.x86_metrics or {}
        if x:
            lines.append(f"  x86 run     max |err| {x['max_abs_logit_error']:.3g}  top-1 "
                         f"{100 * x['top1_agreement']:.2f}%  mean KL {x['mean_kl']:.3g}  "
                         f"ppl ratio {x['ppl_ratio']:.4f}")
    speed = f"  speed       {t['arm_decode_ms_per_token']} ms/token emulated"
    if t.get("x86_decode_ms_per_token"):
        speed += f" vs {t['x86_decode_ms_per_token']} ms/token native"
    if t.get("emulation_slowdown"):
        speed += (f" (wall); CPU {t['arm_decode_cpu_ms_per_token']} vs {t['x86_decode_cpu_ms_per_token']} ms/token, "
                  f"{t['emulation_slowdown']}x")
    lines.append(speed)
    return "\n".join(lines)
