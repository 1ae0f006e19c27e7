"""Which number format the network runs in: ``--amp none``, ``bf16`` or ``auto``.

bfloat16 autocast pays only where the hardware computes in bfloat16. On a CPU with
AVX512-BF16 or AMX a Lite0 or ResNet step is about 1.9x faster than in float32; on a
CPU with AVX2 only (e.g. AMD EPYC Zen 3) oneDNN has no bfloat16 kernels and the same
step was 11-13x *slower* (``benchmarks/precision.py``, docs/performance.md).
``auto`` picks bfloat16 where it is native and float32 elsewhere; an explicit ``bf16``
where it is emulated is kept, with a warning that says what it costs.
"""

from __future__ import annotations

import logging

import torch

AMP_CHOICES = ("none", "bf16", "auto")  # --amp

log = logging.getLogger("mbdml")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 convolutions and matrix products with the CPU's
    own instructions (AVX512 with BF16, or AMX), not emulated through float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_has_native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds the network up on ``device``."""
    if device.type == "cpu":
        return cpu_has_native_bf16()
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False  # MPS and others: not measured, float32


def cpu_model_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for the run's environment.json."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU's vector instruction level as torch sees it (e.g. ``AVX2``, ``AVX512``)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def resolve_amp(amp: str, device: torch.device, warn: bool = True) -> str:
    """``none`` or ``bf16`` for this device: ``auto`` becomes ``bf16`` where the device
    computes bfloat16 natively and ``none`` elsewhere. ``bf16`` asked for where it is
    emulated stays ``bf16`` (the results are valid) with a warning naming the fix
    (unless ``warn`` is False: a caller inside a run that has warned already)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    native = device_has_native_bf16(device) if amp != "none" else False
    if amp == "auto":
        chosen = "bf16" if native else "none"
        where = f"this CPU ({cpu_description()})" if device.type == "cpu" else str(device)
        (log.info if warn else log.debug)("--amp auto: %s on %s", "bfloat16 autocast" if native else "float32, no bfloat16 instructions", where)
        return chosen
    if amp == "bf16" and not native and warn:
        if device.type == "cpu":
            log.warning(
                "--amp bf16 on a CPU without bfloat16 instructions (%s; no AVX512-BF16 or AMX): bfloat16 is emulated here and a "
                "training step is several times slower than in float32 (about 11x measured on an AVX2 CPU); use --amp auto "
                "or --amp none", cpu_description(),
            )
        else:
            log.warning("--amp bf16 on %s, which does not compute in bfloat16 natively: use --amp auto or --amp none", device)
    return amp
