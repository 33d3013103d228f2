"""The captioning engine: images in, captions and decode traces out.

It owns a loaded checkpoint on one device and knows nothing about HTTP or bandits; the CLI, the evaluation
scripts and the service all caption through it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import kernels
from models.checkpoint import Checkpoint, load_checkpoint
from models.decoding import FULL_DEPTH, DecodeTrace, EarlyExitDecoder
from models.model import ConvStemViT
from models.preprocess import images_to_tensor

MODES = ("full", "fixed")


@dataclass
class CaptionResult:
    caption: str
    tokens: list[str]
    trace: DecodeTrace
    threshold: float | None  # None: full depth

    # `tokens`, `exit_layers` and `confidences` are aligned, one entry per generated word (the end-of-caption
    # token is not listed); `trace` keeps every decoding step, end token included, for metrics and the bandit.
    @property
    def exit_layers(self) -> list[int]:
        return self.trace.exit_layers[: len(self.tokens)]

    @property
    def confidences(self) -> list[float]:
        return self.trace.confidences[: len(self.tokens)]

    @property
    def mean_exit_layer(self) -> float:
        """Mean over every decoding step, end token included: the figure that decides decode time."""
        layers = self.trace.exit_layers
        return sum(layers) / len(layers) if layers else 0.0


@dataclass
class BatchTimings:
    encode_s: float
    decode_s: float


@dataclass
class BatchOutput:
    results: list[CaptionResult]
    timings: BatchTimings = field(default_factory=lambda: BatchTimings(0.0, 0.0))


def threshold_for(mode: str, threshold: float | None, calibrated: float | None) -> float:
    """The decoding threshold of a mode: full depth, or a fixed one (default: the `calibrated` one)."""
    if mode == "full":
        return FULL_DEPTH
    if mode != "fixed":
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    if threshold is None:
        threshold = calibrated
        if threshold is None:
            raise ValueError("this checkpoint has no calibrated threshold: run `capeen calibrate`, "
                             "or give a threshold")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`; torch knows more device kinds (xpu, meta...), which the engine was
    never made for, and some of them fail only halfway through a run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    return torch.device(name)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_backends(device: torch.device):
    """Attention kernels for decoding on `device`: on CUDA, any but cuDNN's.

    cuDNN's attention builds a graph for every new shape it meets, a few milliseconds each; early exit changes
    the number of rows running at each layer, token after token, so nearly every call is a new shape. On an
    H200 that made bf16 early exit at batch 8 take 52.95 ms per caption against 18.69 at full depth
    (BENCHMARKS.md, "On a GPU"). Flash, memory-efficient and plain attention have no such cost."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class CaptionEngine:
    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu", half: bool = False,
                 kv_fill: str | None = None, dtype: torch.dtype | None = None) -> None:
        """`half` asks for bf16 (fp16 where bf16 is unsupported) on CUDA and is ignored on a CPU, where those
        kernels are slower than fp32 at these sizes. `dtype` overrides that choice on any device (the tests
        run the half-precision decode path on a CPU with it)."""
        self.device = resolve_device(device) if isinstance(device, str) else device
        if dtype is None:
            dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
                if half and self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        model = checkpoint.model
        if any(p.device != self.device or p.dtype != self.dtype for p in model.parameters()):
            # converted in place, the checkpoint's model would change under any other engine built from it
            model = copy.deepcopy(model)
        self.model = model.to(self.device, self.dtype).eval()
        self.checkpoint = dataclasses.replace(checkpoint, model=self.model)  # what this engine decodes with
        if isinstance(self.model.encoder, ConvStemViT):
            self.model.encoder.fold_batchnorm()
        if self.device.type == "cpu":  # the encoder's products are large (every patch of every image)
            kernels.dispatch_large_linears(self.model.encoder)
            if self.model.enc_to_dec_proj is not None:
                kernels.dispatch_large_linears(self.model.enc_to_dec_proj)
        self.tokenizer = checkpoint.tokenizer
        self.config = self.model.config
        # a calibration may have chosen to consult only some of the trained exits (see models.calibration)
        # and to add an offset to the threshold at each (a schedule of per-exit thresholds); its threshold
        # holds for the way it filled skipped layers' keys and values, which is then the default here
        details = checkpoint.thresholds.details
        self.decoder = EarlyExitDecoder(self.model, exits=details.get("exit_layers"),
                                        exit_offsets=details.get("exit_offsets"),
                                        kv_fill=kv_fill or details.get("kv_fill", "propagate"))

    @classmethod
    def from_checkpoint(cls, path: Path | str | None = None, device: str = "auto", half: bool = False,
                        kv_fill: str | None = None) -> "CaptionEngine":
        return cls(load_checkpoint(path, device="cpu"), device=device, half=half, kv_fill=kv_fill)

    @property
    def calibrated_threshold(self) -> float | None:
        return self.checkpoint.thresholds.threshold

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """The exits consulted when decoding with a threshold (1-based layers; the last layer always ends)."""
        return self.decoder.exits

    @property
    def exit_offsets(self) -> tuple[float, ...]:
        """Added to a request's threshold at each of `exit_layers` (all zero unless calibrated otherwise)."""
        return self.decoder.exit_offsets

    @property
    def kv_fill(self) -> str:
        """How the skipped layers' keys and values are filled (models.decoding): propagate or deferred."""
        return self.decoder.kv_fill

    @property
    def name(self) -> str:
        return self.checkpoint.name

    def threshold_for(self, mode: str, threshold: float | None = None) -> float:
        """The decoding threshold of a mode: full depth, or a fixed one (default: the calibrated one)."""
        return threshold_for(mode, threshold, self.calibrated_threshold)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode(pixel_values.to(self.device, self.dtype))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, self.config.image_size, self.device, self.dtype)

    @torch.inference_mode()
    def caption_pixels(self, pixel_values: torch.Tensor, thresholds: list[float] | float,
                       max_tokens: int | None = None, observe_exits: bool = False,
                       exits: tuple[int, ...] | None = None, simulate_exits: bool = False,
                       exit_offsets: tuple[float, ...] | None = None) -> BatchOutput:
        """Caption a batch of preprocessed images, each with its own threshold (`FULL_DEPTH`: every layer)."""
        if not len(pixel_values):  # the encoder's products have no shape for no image
            return BatchOutput([])
        start = time.perf_counter()
        with attention_backends(self.device):
            states = self.encode(pixel_values)
            _synchronize(self.device)
            encoded = time.perf_counter()
            traces = self.decoder.decode(states, thresholds, max_tokens=max_tokens, observe_exits=observe_exits,
                                         exits=exits, simulate_exits=simulate_exits, exit_offsets=exit_offsets)
            _synchronize(self.device)
        done = time.perf_counter()
        results = []
        for trace in traces:
            words = self.tokenizer.words_until_eos(trace.token_ids)
            threshold = None if trace.threshold > 1.0 else trace.threshold
            caption = " ".join(self.tokenizer.decode(trace.token_ids))
            results.append(CaptionResult(caption=caption, tokens=words, trace=trace, threshold=threshold))
        return BatchOutput(results, BatchTimings(encode_s=encoded - start, decode_s=done - encoded))

    def caption(self, images: list[Image.Image], thresholds: list[float] | float = FULL_DEPTH,
                max_tokens: int | None = None) -> BatchOutput:
        if not images:
            return BatchOutput([])
        return self.caption_pixels(self.pixels(images), thresholds, max_tokens=max_tokens)

    def warmup(self) -> None:
        """Run every code path once so that the first real request does not pay for lazy initialisation."""
        blank = torch.zeros(2, 3, self.config.image_size, self.config.image_size, device=self.device, dtype=self.dtype)
        self.caption_pixels(blank, [FULL_DEPTH, 0.5], max_tokens=4)
