"""Matrix products on the CPU: MKL for small ones, oneDNN for large ones.

torch sends a float32 matrix product on the CPU to MKL. On AMD CPUs, MKL runs its AVX2 kernels even where the
CPU has AVX-512, and oneDNN (also inside torch) runs AVX-512 ones. On this project's 2-core AMD EPYC,
oneDNN is up to twice as fast for products of a million multiply-adds and more, but it pays a fixed ~13 us
per call, which makes it slower than MKL for small ones. So the image encoder's products and the
cross-attention keys and values of every layer (one product per batch) go to oneDNN when they are large
(`ONEDNN_MIN_MACS`). The decoder layers' own products stay on MKL: they are small at the batch sizes served,
and sending the large ones of big batches to oneDNN too was no faster in the decode loop. `capeen bench
--compare-kernels` measures the crossover and the gain; BENCHMARKS.md ("oneDNN for large products") has them.

Inference only: the oneDNN op has no autograd, so anything that needs gradients stays on MKL. So does a
weight that is a strided view (a column slice of a wider matrix, say): oneDNN has no fast kernel for that
layout and fell to one hundreds of times slower. Where the op is
missing or fails its self-check (another torch build), everything stays on MKL. `set_onednn(False)` or the
`onednn_disabled()` context turns it off process-wide, for comparisons.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# measured crossover: at 2**20 multiply-adds oneDNN is level with MKL for the model's shapes, beyond it faster
ONEDNN_MIN_MACS = 1 << 20

_enabled = True
_available: bool | None = None  # decided on first use


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _self_check() -> bool:
    """Whether this torch build has a working oneDNN linear op that agrees with F.linear."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(70, 48, generator=generator)
        weight = torch.randn(40, 48, generator=generator)
        bias = torch.randn(40, generator=generator)
        with torch.inference_mode():
            ok = torch.allclose(_onednn_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4)
    except (AttributeError, RuntimeError) as exc:
        log.info("oneDNN linear unavailable (%s): every product stays on MKL", exc)
        return False
    if not ok:
        log.warning("oneDNN linear disagrees with F.linear: every product stays on MKL")
    return ok


def onednn_active() -> bool:
    """Whether large CPU products go to oneDNN now."""
    global _available
    if not _enabled:
        return False
    if _available is None:
        _available = _self_check()
    return _available


def set_onednn(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


@contextmanager
def onednn_disabled() -> Iterator[None]:
    """Every product on MKL inside the block (process-wide: for side-by-side measurements)."""
    previous = _enabled
    set_onednn(False)
    try:
        yield
    finally:
        set_onednn(previous)


def is_large(multiply_adds: int) -> bool:
    """Whether a product of this many multiply-adds is worth oneDNN's fixed cost."""
    return multiply_adds >= ONEDNN_MIN_MACS


def _large(x: torch.Tensor, weight: torch.Tensor, n_out: int) -> bool:
    return is_large(x.numel() * n_out) and x.dtype == torch.float32 and x.device.type == "cpu" \
        and (weight.is_contiguous() or weight.t().is_contiguous()) and onednn_active()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` (weight: (out, in)), on oneDNN when the product is large."""
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    if _large(x, weight, weight.shape[0]) and not needs_grad:
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def addmm(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`torch.addmm(bias, x, weight)` for inference (x: (rows, in), weight: (in, out); bias: (out,) or the
    (rows, out) residual to add), on oneDNN when the product is large."""
    if not _large(x, weight, weight.shape[1]):
        return torch.addmm(bias, x, weight)
    if bias.dim() == 1:
        return _onednn_linear(x, weight.t(), bias)
    return _onednn_linear(x, weight.t(), None).add_(bias)


class SizeDispatchedLinear(nn.Linear):
    """An `nn.Linear` whose large products run on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def dispatch_large_linears(module: nn.Module) -> int:
    """Turn every plain `nn.Linear` inside `module` into a `SizeDispatchedLinear`, in place; returns how many."""
    count = 0
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = SizeDispatchedLinear
            count += 1
    return count
