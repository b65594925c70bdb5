"""Validation on an emulated Arm device: the artifact in the aarch64 build of its runtime, under qemu.

`rgexport validate --device emulated-arm64` runs `rgexport/emulate/device_runner.py` (a standalone program that
drives an artifact from its manifest alone) with an arm64 Python and the aarch64 wheels of the runtime,
under qemu user-mode emulation, on the same held-out tokens as host validation. Its logits are judged
against the fp32 reference step model on this machine with the thresholds of `rgexport validate`, and
compared with the same program running the same artifact natively on this machine (x86), so the report
says where Arm results differ from x86 ones and by how much.

Everything it needs is set up on first use and cached under `~/.cache/rgexport/emulated-arm64`
(`$RGEXPORT_CACHE/emulated-arm64` when set; `environment.py`; `driver.py` runs and judges):
  qemu-aarch64-static   from Debian's qemu-user-static (installed with apt-get when missing and root)
  root/                 an arm64 Python extracted with `dpkg -x` from Debian arm64 packages that
                        `apt-get --download-only` fetches with the arm64 architecture given as options
                        and a private state folder, so the system's dpkg configuration is not changed
  site/<runtime>-<v>/   the runtime's aarch64 wheels (`pip install --target --platform ...`), the same
                        version as on this machine, numpy pinned to this machine's version
  views/<cpu>/          the root seen by one emulated CPU model: symlinks to root/ plus proc/cpuinfo.
                        onnxruntime and LiteRT (through pytorch/cpuinfo) read /proc/cpuinfo and crash
                        ("uncaught target signal 11") on the host's x86 one; qemu 7.2 does not emulate
                        it for aarch64, but `-L` serves a guest's open("/proc/cpuinfo") from the root
                        when the file exists there, so each view holds an Arm cpuinfo whose Features
                        are the hwcaps the emulated CPU reports.

The emulated CPU defaults to `cortex-a76` (Armv8.2 with dot product and fp16: a typical phone big
core); `max` is qemu's Armv9 with SVE2, i8mm, bf16 and SME, where runtimes pick other kernels.
"""

from rgexport.emulate.driver import (
    RUNNER_SCRIPT,
    EmulatedValidation,
    compare_runs,
    format_emulated,
    info_of,
    judge_run,
    run_native,
    run_on_device,
    states_of,
    validate_emulated,
)
from rgexport.emulate.environment import (
    DEFAULT_CPU,
    DEVICE,
    DEVICES,
    QEMU_CPUS,
    ArmEnvironment,
    cache_report,
    cache_root,
    cpuinfo_text,
    effective_cpu,
    ensure_environment,
)

__all__ = [
    "DEFAULT_CPU", "DEVICE", "DEVICES", "QEMU_CPUS", "RUNNER_SCRIPT", "ArmEnvironment", "EmulatedValidation",
    "cache_report", "cache_root", "compare_runs", "cpuinfo_text", "effective_cpu", "ensure_environment",
    "format_emulated", "info_of", "judge_run", "run_native", "run_on_device", "states_of", "validate_emulated",
]
