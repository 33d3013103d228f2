"""Matrix products on the CPU: MKL for small ones, oneDNN for large ones where it is the faster.

torch sends a float32 matrix product on the CPU to MKL. On AMD CPUs, MKL runs its AVX2 kernels even where the
CPU has AVX-512, and oneDNN (also inside torch) runs AVX-512 ones. On this project's 2-core AMD EPYC,
oneDNN is up to twice as fast for products of a million multiply-adds and more, but it pays a fixed ~13 us
per call, which makes it slower than MKL for small ones. So the image encoder's products and the
cross-attention keys and values of every layer (one product per batch) go to oneDNN when they are large
(`ONEDNN_MIN_MACS`). The decoder layers' own products stay on MKL: they are small at the batch sizes served,
and sending the large ones of big batches to oneDNN too was no faster in the decode loop. `capeen bench
--compare-kernels` measures the crossover and the gain; BENCHMARKS.md ("oneDNN for large products") has them.

Which library is faster depends on the CPU: on an Intel Xeon (Sapphire Rapids), MKL runs AVX-512 itself and
was as fast as oneDNN for the largest products and faster for all others. So by default (`"auto"`) the choice is
measured once per process, on first use: one product of the size the encoder does for a batch of 8 images, MKL
against oneDNN in interleaved rounds. oneDNN takes the large products only if it is at least `AUTO_MIN_GAIN` times
as fast. `set_onednn(True)` or `False` skips the measurement.

Inference only: the oneDNN op has no autograd, so anything that needs gradients stays on MKL. So does a
weight that is a strided view (a column slice of a wider matrix, say): oneDNN has no fast kernel for that
layout and fell to one hundreds of times slower. Where the op is
missing or fails its self-check (another torch build), everything stays on MKL. `set_onednn(False)` or the
`onednn_disabled()` context turns it off process-wide, `onednn_forced()` on, for comparisons.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# measured crossover: at 2**20 multiply-adds oneDNN is level with MKL for the model's shapes, beyond it faster
ONEDNN_MIN_MACS = 1 << 20

# "auto": measured. oneDNN must be this much faster than MKL to take the large products: a smaller gain is within
# the measurement's noise, and MKL is what every other product runs on
AUTO_MIN_GAIN = 1.15
# the measured product: (8 images x 65 image tokens) rows, 128 in, 512 out (an encoder MLP of a batch of 8)
AUTO_PRODUCT = (520, 128, 512)
AUTO_ROUNDS = 7

Setting = bool | Literal["auto"]
_setting: Setting = "auto"
_available: bool | None = None  # decided on first use
_auto_gain: float | None = None  # "auto": oneDNN's speed over MKL's, measured on first use


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


def onednn_available() -> bool:
    """Whether this torch build has a working oneDNN linear op (whatever the setting)."""
    global _available
    if _available is None:
        _available = _self_check()
    return _available


def time_both(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, calls: int,
              rounds: int) -> tuple[float, float]:
    """Median seconds of one product `x @ weight + bias` (weight: (in, out)) on MKL and on oneDNN, in interleaved
    rounds of `calls` calls each (a busy spell of the machine then slows both alike)."""
    samples: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for _ in range(rounds):
            for seconds, run in zip(samples, (lambda: torch.addmm(bias, x, weight),
                                              lambda: _onednn_linear(x, weight.t(), bias))):
                run()  # the first call of a round warms the caches
                start = time.perf_counter()
                for _ in range(calls):
                    run()
                seconds.append((time.perf_counter() - start) / calls)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _time_products(rounds: int = AUTO_ROUNDS) -> tuple[float, float]:
    """`time_both` on `AUTO_PRODUCT`."""
    rows, n_in, n_out = AUTO_PRODUCT
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, n_in, generator=generator), torch.randn(n_in, n_out, generator=generator)
    return time_both(x, weight, torch.randn(n_out, generator=generator), calls=3, rounds=rounds)


def auto_gain() -> float:
    """oneDNN's speed over MKL's on `AUTO_PRODUCT` on this machine (measured once; 0.0 without oneDNN)."""
    global _auto_gain
    if _auto_gain is None:
        if not onednn_available():
            return 0.0
        mkl_s, onednn_s = _time_products()
        _auto_gain = mkl_s / onednn_s
        rows, n_in, n_out = AUTO_PRODUCT
        log.info("oneDNN ran a %dx%d by %dx%d product %.2fx as fast as MKL: large products go to %s", rows, n_in,
                 n_in, n_out, _auto_gain, "oneDNN" if _auto_gain >= AUTO_MIN_GAIN else "MKL")
    return _auto_gain


def onednn_active() -> bool:
    """Whether large CPU products go to oneDNN now."""
    if _setting is False or not onednn_available():
        return False
    return _setting is True or auto_gain() >= AUTO_MIN_GAIN


def set_onednn(setting: Setting) -> None:
    """True: large products on oneDNN; False: every product on MKL; "auto": whichever measures faster here."""
    global _setting
    if setting not in (True, False, "auto"):
        raise ValueError(f"onednn must be true, false or auto, got {setting!r}")
    _setting = setting


def onednn_setting() -> Setting:
    return _setting


@contextmanager
def _onednn_set(setting: Setting) -> Iterator[None]:
    previous = _setting
    set_onednn(setting)
    try:
        yield
    finally:
        set_onednn(previous)


def onednn_disabled() -> AbstractContextManager[None]:
    """Every product on MKL inside the block (process-wide: for side-by-side measurements)."""
    return _onednn_set(False)


def onednn_forced() -> AbstractContextManager[None]:
    """Large products on oneDNN inside the block, where this torch build has it, whatever "auto" measured."""
    return _onednn_set(True)


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
