"""Training precision: FP32, or bf16 autocast where the hardware runs bf16 natively.

``auto`` picks bf16 on a device with native bf16 arithmetic (a CUDA GPU of compute
capability 8.0 or newer; a CPU with AVX-512 BF16 or AMX, where oneDNN runs bf16
convolutions and matrix products far faster than FP32) and FP32 elsewhere.
``bf16`` on hardware without native bf16 is refused: emulated bf16 runs slower
than FP32, which is never what a user asking for speed wants.

Only the forward and backward of the training step run under autocast. Ring
values, positions and the interpolation stay FP32 (``ring_math.soft_values``
leaves autocast), the loss is taken in FP32, and every reported accuracy is
computed in FP32 (:func:`ringq.engine.evaluate` never autocasts, and runs under
:func:`strict_fp32`, so not in TF32 either).
"""
import contextlib

import torch

from .errors import RingqError

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device):
    """True when ``device`` (torch.device) computes in bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def hardware_name(device):
    """A short description of ``device`` for messages: the GPU name or the CPU's capability."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512 BF16 or AMX)"


def resolve_precision(name, device):
    """``fp32`` or ``bf16``: what ``name`` (one of PRECISIONS) means on ``device``.

    Raises RingqError for ``bf16`` on a device without native bf16.
    """
    if name not in PRECISIONS:
        raise RingqError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name == "fp32":
        return "fp32"
    if native_bf16(device):
        return "bf16"
    if name == "auto":
        return "fp32"
    raise RingqError(f"precision bf16: {hardware_name(device)} has no native bf16 arithmetic, "
                     f"so bf16 would run slower than FP32; use --precision fp32 (or auto)")


@contextlib.contextmanager
def strict_fp32():
    """Run a block in true FP32 on CUDA: no TF32 in matrix products or convolutions, then restore.

    Evaluation runs in it, so a reported accuracy is the FP32 network's on any GPU.
    """
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def autocast(device, precision):
    """bf16 autocast context on ``device`` for precision ``bf16``; a no-op for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
