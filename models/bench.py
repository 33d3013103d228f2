"""`capeen bench`: what early exit buys over the decoders a user would otherwise run.

Three ways to caption the same images with the same weights:
  (a) Hugging Face `VisionEncoderDecoderModel.generate()`, greedy (our checkpoint converted in memory),
  (b) our decoder at full depth,
  (c) our decoder with early exit at the calibrated threshold.
Latency per caption at batch 1 and throughput at larger batches are measured with the three interleaved batch by
batch, so that machine noise hits them alike. A profile splits (c)'s decode time into decoder layers, exit heads,
state propagation, the final head and the rest (Python bookkeeping, embedding, cache handling). For (b) and (c)
the time is also split into the image encoder and the decoder, per image: the encoder's cost per image hardly
falls with the batch, so it bounds what batching can gain.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from models import kernels
from models.decoding import FULL_DEPTH, SectionTimer
from models.engine import CaptionEngine
from models.hf_export import hf_pixel_values, quiet_transformers, to_hf_vision_encoder_decoder
from models.preprocess import normalize


@dataclass
class MethodOutput:
    token_ids: list[list[int]]  # generated token ids per image
    encode_s: float | None = None  # wall time of the image encoder, where the method reports it
    decode_s: float | None = None


@dataclass
class Method:
    name: str
    run: Callable[[torch.Tensor], MethodOutput]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def methods(engine: CaptionEngine, threshold: float, compare_kernels: bool = False) -> list[Method]:
    """HF generate, our full depth and our early exit (with the kernels as set: by default, measured); with
    `compare_kernels`, our two again with every product on MKL and with the large ones on oneDNN
    (models.kernels), to measure what oneDNN's large products buy in the same run."""
    hf = to_hf_vision_encoder_decoder(engine.model)
    max_new = engine.config.n_positions - 1
    eos = engine.config.eos_token_id

    @torch.inference_mode()
    def run_hf(pixels: torch.Tensor) -> MethodOutput:
        with quiet_transformers():  # it advises an attention mask for padded text; images are not padded
            out = hf.generate(pixel_values=hf_pixel_values(engine.model, pixels), max_new_tokens=max_new,
                              do_sample=False, num_beams=1)
        ids = []
        for row in out[:, 1:].tolist():  # drop the decoder start token
            ids.append(row[: row.index(eos) + 1] if eos in row else row)
        return MethodOutput(ids)

    def ours(t: float) -> Callable[[torch.Tensor], MethodOutput]:
        def run(pixels: torch.Tensor) -> MethodOutput:
            out = engine.caption_pixels(pixels, t)
            return MethodOutput([r.trace.token_ids for r in out.results], out.timings.encode_s, out.timings.decode_s)
        return run

    def on_kernels(run: Callable[[torch.Tensor], MethodOutput],
                   kernel_choice: Callable[[], AbstractContextManager[None]]) -> Callable[[torch.Tensor], MethodOutput]:
        def run_on_kernels(pixels: torch.Tensor) -> MethodOutput:
            with kernel_choice():
                return run(pixels)
        return run_on_kernels

    listed = [
        Method("hf-generate", run_hf),
        Method("capeen-full", ours(FULL_DEPTH)),
        Method(f"capeen-early-exit@{threshold:g}", ours(threshold)),
    ]
    if compare_kernels:
        for suffix, kernel_choice in (("mkl-only", kernels.onednn_disabled), ("onednn", kernels.onednn_forced)):
            listed += [Method(f"{m.name}/{suffix}", on_kernels(m.run, kernel_choice)) for m in listed[1:3]]
    return listed


class TooFewImages(ValueError):
    """Not enough images for the warm-up batches and one measured batch."""


def measure(engine: CaptionEngine, pixels_uint8: torch.Tensor, batch_size: int, method_list: Sequence[Method],
            warmup: int = 2) -> dict[str, dict]:
    """Seconds per batch for every method, interleaved (rotating order) over the images."""
    device = engine.device
    times: dict[str, list[float]] = {m.name: [] for m in method_list}
    outputs: dict[str, list[list[int]]] = {m.name: [] for m in method_list}
    split: dict[str, list[tuple[float, float]]] = {m.name: [] for m in method_list}
    batches = [pixels_uint8[i:i + batch_size] for i in range(0, len(pixels_uint8) - batch_size + 1, batch_size)]
    if len(batches) <= warmup:
        raise TooFewImages(f"batch size {batch_size} needs at least {(warmup + 1) * batch_size} images "
                           f"({warmup} warm-up batches and one measured), got {len(pixels_uint8)}")
    for b, raw in enumerate(batches):
        pixels = normalize(raw.to(device), engine.dtype)
        order = list(method_list[b % len(method_list):]) + list(method_list[: b % len(method_list)])
        for method in order:
            _sync(device)
            start = time.perf_counter()
            out = method.run(pixels)
            _sync(device)
            elapsed = time.perf_counter() - start
            if b >= warmup:
                times[method.name].append(elapsed)
                outputs[method.name].extend(out.token_ids)
                if out.encode_s is not None and out.decode_s is not None:
                    split[method.name].append((out.encode_s, out.decode_s))
    report = {}
    for name, samples in times.items():
        total = sum(samples)
        images = len(samples) * batch_size
        report[name] = {
            "batch_size": batch_size,
            "batches": len(samples),
            "ms_per_caption": 1000 * total / images,
            "p50_batch_ms": 1000 * statistics.median(samples),
            "captions_per_s": images / total,
            "tokens": outputs[name],
        }
        if split[name]:
            report[name]["encode_ms_per_image"] = 1000 * sum(e for e, _ in split[name]) / images
            report[name]["decode_ms_per_caption"] = 1000 * sum(d for _, d in split[name]) / images
    return report


def agreement(report: dict[str, dict], a: str, b: str) -> float:
    """Share of captions two methods produced token for token identically."""
    pairs = list(zip(report[a]["tokens"], report[b]["tokens"]))
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def profile_early_exit(engine: CaptionEngine, pixels_uint8: torch.Tensor, threshold: float,
                       batch_size: int = 1) -> dict[str, float]:
    """Where early-exit decode time goes, in ms per caption, in batches of `batch_size` (whole batches only).

    Side by side over batch sizes it shows which parts batching shares out and which stay per caption."""
    timer = SectionTimer(synchronize=lambda: _sync(engine.device))
    total = 0.0
    n = len(pixels_uint8) - len(pixels_uint8) % batch_size
    engine.decoder.timer = timer
    try:
        for i in range(0, n, batch_size):
            pixels = normalize(pixels_uint8[i:i + batch_size].to(engine.device), engine.dtype)
            total += engine.caption_pixels(pixels, threshold).timings.decode_s
    finally:
        engine.decoder.timer = None
    profile = {name: 1000 * seconds / n for name, seconds in sorted(timer.seconds.items())}
    profile["other (Python, embeddings, cache bookkeeping)"] = 1000 * total / n - sum(profile.values())
    profile["total decode"] = 1000 * total / n
    return profile


def head_cost(engine: CaptionEngine, position: int = 12, repeats: int = 2000) -> dict[str, float]:
    """Microseconds, batch 1, for one decoder layer step as the decode loop runs it (KV cache at `position`)
    against one exit check (LayerNorm + projection to the vocabulary + max softmax), and against what one
    position catching up adds to a layer call (kv_fill="deferred")."""
    cfg, dec = engine.config, engine.decoder
    position = min(position, cfg.n_positions - 1)  # a model made for short captions has fewer
    hd = cfg.n_embd // cfg.n_head
    patches = cfg.encoder_tokens
    kw = dict(device=engine.device, dtype=engine.dtype)
    cache = torch.randn(cfg.n_layer, 2, 1, cfg.n_head, cfg.n_positions, hd, **kw)
    cross = torch.randn(cfg.n_layer, 2, 1, cfg.n_head, patches, hd, **kw)
    h = torch.randn(1, cfg.n_embd, **kw)
    first_exit = dec.exits[0] if dec.exits else cfg.n_layer

    def layer() -> None:
        dec._block(0, h, None, cache, cross, position)

    def exit_check() -> None:
        conf, pred = dec._head(first_exit, h)
        conf.tolist(), pred.tolist()

    pair = torch.randn(2, cfg.n_embd, **kw)

    def layer_with_rider() -> None:  # kv_fill="deferred": one earlier position catching up in the same call
        dec._block_one_row(0, pair, 0, cache, cross, position)

    def timeit(fn, count: int) -> float:
        _sync(engine.device)
        start = time.perf_counter()
        for _ in range(count):
            fn()
        _sync(engine.device)
        return 1e6 * (time.perf_counter() - start) / count

    # interleaved rounds, median per part: the calibration weighs heads and catch-up rows with these ratios,
    # and a machine whose speed drifts during one long timing would skew them
    parts = (layer, exit_check, layer_with_rider)
    rounds = 7
    samples: list[list[float]] = [[] for _ in parts]
    with torch.inference_mode():
        for fn in parts:
            timeit(fn, 50)
        for _ in range(rounds):
            for fn, times in zip(parts, samples):
                times.append(timeit(fn, max(1, repeats // rounds)))
    layer_us, head_us, with_rider_us = (statistics.median(times) for times in samples)
    return {"decoder_layer_us": layer_us, "exit_check_us": head_us, "ratio": head_us / layer_us,
            "catch_up_us": with_rider_us - layer_us, "catch_up_ratio": max(0.0, with_rider_us - layer_us) / layer_us}


def kernel_crossover(engine: CaptionEngine, rows: Sequence[int] = (1, 8, 16, 32, 65, 130, 1040),
                     repeats: int = 7) -> list[dict]:
    """Microseconds per product on MKL and on oneDNN for the model's product shapes at several row counts,
    median of interleaved rounds, and which one `models.kernels` picks: the measurement behind its threshold."""
    cfg = engine.config
    shapes = {  # the products that go through models.kernels (the decoder layers' own stay on MKL)
        "encoder attention projection": (cfg.encoder_hidden, cfg.encoder_hidden),
        "encoder MLP in": (cfg.encoder_hidden, cfg.encoder_intermediate),
        "encoder MLP out": (cfg.encoder_intermediate, cfg.encoder_hidden),
        "cross-attention keys/values, every layer": (cfg.n_embd, 2 * cfg.n_embd * cfg.n_layer),
    }
    generator = torch.Generator().manual_seed(0)
    table = []
    with torch.inference_mode():
        for name, (n_in, n_out) in shapes.items():
            weight, bias = torch.randn(n_in, n_out, generator=generator), torch.randn(n_out, generator=generator)
            for count in rows:
                x = torch.randn(count, n_in, generator=generator)
                calls = max(5, min(500, 2_000_000 // (count * n_in * n_out // 64 + 1)))
                mkl_s, onednn_s = kernels.time_both(x, weight, bias, calls, repeats)
                mkl_us, onednn_us = 1e6 * mkl_s, 1e6 * onednn_s
                table.append({"product": name, "in": n_in, "out": n_out, "rows": count,
                              "multiply_adds": count * n_in * n_out, "mkl_us": mkl_us, "onednn_us": onednn_us,
                              "picked": "onednn" if kernels.onednn_active() and kernels.is_large(count * n_in * n_out)
                              else "mkl"})
    return table


def kernel_choice() -> dict:
    """Where this process sends its large CPU products, and why (models.kernels)."""
    setting = kernels.onednn_setting()
    choice = {"setting": setting, "large_products_on": "onednn" if kernels.onednn_active() else "mkl"}
    if setting == "auto" and kernels.onednn_available():
        choice["onednn_gain"] = kernels.auto_gain()
    return choice


def describe_kernel_choice(choice: dict) -> str:
    on = "oneDNN" if choice["large_products_on"] == "onednn" else "MKL"
    if "onednn_gain" not in choice:
        return f"large CPU products on {on} (CAPEEN_ONEDNN={str(choice['setting']).lower()})"
    rows, n_in, n_out = kernels.AUTO_PRODUCT
    return (f"large CPU products on {on}: oneDNN measured {choice['onednn_gain']:.2f}x as fast as MKL on a "
            f"{rows}x{n_in} by {n_in}x{n_out} product (it takes them from {kernels.AUTO_MIN_GAIN:.2f}x)")
