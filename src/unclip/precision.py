"""Whether a device computes in bfloat16 natively, and what a request for bf16 becomes there.

A CPU without AVX-512-BF16 or AMX (every AVX2-only CPU: most laptops, older servers) emulates
bfloat16: on such a machine of 2 cores a 3×3 convolution's forward and backward under bf16
autocast took 35× its float32 time, a linear layer's 30× (docs/performance.md). Sampling's
`precision="auto"` and training's `mixed_precision="bf16"` therefore compute in float32 there.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_TOLD: set[str] = set()  # what the fallback was said for, once per process


def native_bf16(device: torch.device | str) -> bool:
    """True on a GPU that supports bfloat16 and on CPUs with AVX-512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch builds without these probes
        return False


def training_precision(requested: str, device: torch.device | str, what: str) -> str:
    """The autocast a training run of `what` uses: `requested` ("no" or "bf16"), except that bf16
    on a device that would emulate it trains in float32 ("no"), and the log says so once."""
    if requested != "bf16" or native_bf16(device):
        return requested
    if what not in _TOLD:
        _TOLD.add(what)
        log.warning("%s: mixed_precision is bf16, but this %s has no bfloat16 units (AVX-512-BF16 or AMX), where bf16 "
                    "is emulated and many times slower than float32; training in float32 instead (the same "
                    "schedule; only the rounding differs)", what, torch.device(device).type.upper())
    return "no"
