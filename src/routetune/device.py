"""Where a run computes and in which precision, chosen from the machine once per process.

``train.device`` (auto | cpu | cuda | cuda:N) and ``train.precision`` (auto | fp32 | bf16 | fp16)
are what the user asked for; :func:`resolve` turns them into a :class:`Hardware` with the reason
for each choice, which is logged at start and stored in the run folder (``hardware.json``).

Precision `auto`:

* CUDA: bf16 autocast where the GPU supports it (Ampere and newer), else fp16 with a gradient
  scaler;
* CPU: bf16 autocast only where the CPU computes bf16 natively (AMX or AVX512-BF16), fp32
  otherwise. On a CPU without them (AVX2-only x86, most AMD and older Intel parts) bf16 matmuls
  are emulated: a 1024^2 bf16 matmul ran at 0.9 GFLOP/s against 175 in fp32 on the same core
  (docs/benchmarks.md), so bf16 there is never a speed-up.

The CPU check reads the kernel's CPU flags; ``ONEDNN_MAX_CPU_ISA`` (oneDNN's own cap on the
instructions it uses, which PyTorch's CPU matmuls go through) is honoured, so a cap below the
bf16 instructions counts as no native bf16.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from routetune.config.schema import check_device, check_precision
from routetune.errors import ConfigError

log = logging.getLogger("routetune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above which bf16 matmuls are native
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), or None where they cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_bf16(flags: set[str] | None = None, env: dict | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and why (for the log)."""
    flags = cpu_flags() if flags is None else flags
    env = os.environ if env is None else env
    if flags is None:
        return False, f"CPU flags not readable on {platform.system() or 'this system'}; assuming no native bf16"
    native = sorted(f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags)
    # on Arm, `bf16` in Features; on x86 the AMX / AVX512-BF16 flags
    if not native:
        kind = "AVX2" if "avx2" in flags and "avx512f" not in flags else torch.backends.cpu.get_cpu_capability()
        return False, f"CPU without native bf16 ({kind}; no AMX or AVX512-BF16)"
    cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    if cap and cap.upper() not in _ONEDNN_BF16_ISAS:
        return False, f"CPU has {'/'.join(native)} but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN below it"
    return True, f"CPU with native bf16 ({'/'.join(native)})"


@dataclass(frozen=True)
class Hardware:
    """The resolved device and precision of this process, with the reasons."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return autocast(self.precision, self.device.type)

    def describe(self) -> dict:
        """What hardware.json holds: enough to tell later which machine produced a run."""
        out = {"device": str(self.device), "precision": self.precision, "reason": self.reason,
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpu": _cpu_name(), "threads": torch.get_num_threads()}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                       cuda=torch.version.cuda)
        return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(spec: str = "auto", key: str = "train.device") -> torch.device:
    """`auto`: the current CUDA device when one is available, else the CPU."""
    check_device(spec, key)
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {spec} asked for, but this PyTorch ({torch.__version__}) sees no CUDA device; "
                              "use auto or cpu (a run trained on a GPU resumes and serves on a CPU)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {spec} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                              f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        device = torch.device("cuda", index)
    return device


def resolve(device: str = "auto", precision: str = "auto",
            names: tuple[str, str] = ("train.device", "train.precision")) -> Hardware:
    """Resolve the requested device and precision against this machine (see the module docstring).
    `names` are the config keys or CLI options the two values came from, for messages."""
    dev = resolve_device(device, names[0])
    key = names[1]
    check_precision(precision, key)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "auto":
            if bf16:
                return Hardware(dev, "bf16", f"auto: {name} supports bf16")
            return Hardware(dev, "fp16", f"auto: {name} has no bf16; fp16 with a gradient scaler")
        if precision == "bf16" and not bf16:
            raise ConfigError(f"{key}: bf16 asked for, but {name} does not support it; use auto or fp16")
        return Hardware(dev, precision, f"{precision} as configured on {name}")
    native, why = cpu_bf16()
    if precision == "auto":
        return Hardware(dev, "bf16" if native else "fp32", f"auto: {why}")
    if precision == "bf16" and not native:
        log.warning("%s=bf16, but %s: bf16 is emulated there, far slower than fp32 (measured: a bf16 matmul "
                    "~200x, a quickstart training step ~20x slower); use precision auto or fp32", key, why)
    if precision == "fp16":
        log.warning("%s=fp16 on the CPU: fp16 autocast there is meant for testing; most CPUs compute "
                    "it slower than fp32, and bf16 (where native) is the CPU's fast 16-bit type", key)
    return Hardware(dev, precision, f"{precision} as configured ({why})")


def inference_hardware(device: str | None = None, precision: str | None = None) -> Hardware:
    """Device and precision for evaluating, predicting or serving a run on this machine: chosen
    here like a training run's `auto` (not copied from the run, which may have trained on other
    hardware), unless given (the CLI's --device / --precision)."""
    return resolve(device or "auto", precision or "auto", names=("--device", "--precision"))


def autocast(precision: str, device_type: str = "cpu"):
    """Autocast context of `precision` on `device_type`; fp32 is no autocast at all."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(tensors: dict, device: torch.device) -> dict:
    """Move a batch's tensors; on CUDA through pinned memory, so the copy does not block the host."""
    if device.type == "cpu":
        return tensors
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) or hasattr(v, "to") else v for k, v in tensors.items()}
    # other values with a `to` (a padding-free layout, model/packing.py) move themselves
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v)
            else v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in tensors.items()}
