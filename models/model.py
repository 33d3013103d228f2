"""The CAPEEN captioner: an image encoder (a transformers ViT or Swin), a GPT-2 decoder with cross-attention, and
exit heads.

The ViT may sit behind a small convolutional stem (`stem_channels`): 3x3 stride-2 convolutions that see a shape
across patch borders, where a linear patch embedding cannot (Xiao et al., 2021, "Early convolutions help
transformers see better").

The decoder is written here rather than taken from `transformers` so that decoding can be driven one layer at
a time (see `models.decoding`): every block exposes its self-attention, cross-attention and MLP steps. Its
parameter names and layouts follow Hugging Face's `GPT2LMHeadModel(add_cross_attention=True)` exactly
(`transformer.h.{i}.attn.c_attn`, Conv1D weights stored as (in, out), `lm_head` tied to `wte`), so GPT-2
weights load with a plain `load_state_dict`.

An exit head (LayerNorm + linear to the vocabulary) sits after each configured decoder layer; the final layer
uses the decoder's own `ln_f` + `lm_head`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers import SwinConfig, SwinModel, ViTConfig, ViTModel

ENCODERS = ("vit", "swin")


@dataclass
class CapeenConfig:
    # image encoder: a transformers ViT, or a Swin (the paper's encoder: small patches, local windows, and a
    # width that doubles per stage up to encoder_hidden, which sees small shapes better at a similar cost)
    encoder: str = "vit"
    image_size: int = 96
    patch_size: int = 12
    encoder_hidden: int = 128
    encoder_layers: int = 4  # ViT only
    encoder_heads: int = 4  # ViT only
    encoder_intermediate: int = 512  # ViT: MLP width; Swin: MLP ratio x encoder_hidden
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 4])  # blocks per Swin stage
    swin_heads: list[int] = field(default_factory=lambda: [1, 2, 4])  # attention heads per Swin stage
    swin_window: int = 6
    # ViT only: one 3x3 stride-2 convolution (+ BatchNorm + GELU) per width listed, before the patch embedding;
    # each halves the image, so patch_size then counts pixels of the last convolution's output
    stem_channels: list[int] = field(default_factory=list)
    # GPT-2 style decoder
    vocab_size: int = 100
    n_positions: int = 32
    n_embd: int = 128
    n_layer: int = 12
    n_head: int = 4
    n_inner: int = 512
    layer_norm_epsilon: float = 1e-5
    # 1-based decoder layers followed by an exit head; the last layer always exits through ln_f + lm_head.
    # None: after every layer but the last, however many n_layer makes
    exit_layers: list[int] | None = None
    # special token ids, fixed by models.tokenizer
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "encoder_hidden", "encoder_layers", "encoder_heads",
                 "encoder_intermediate", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_positions < 3:
            raise ValueError(f"n_positions must be at least 3: BOS, one word, EOS; got {self.n_positions}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id below vocab_size ({self.vocab_size}), got {value!r}")
        epsilon = self.layer_norm_epsilon
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < 1:
            raise ValueError(f"layer_norm_epsilon must be a small positive number, got {epsilon!r}")
        if self.exit_layers is None:
            self.exit_layers = list(range(1, self.n_layer))
        if not isinstance(self.exit_layers, (list, tuple)):
            raise ValueError(f"exit_layers must be a list of layer numbers, got {self.exit_layers!r}")
        # true, 2.9 or "2" would silently become some layer: only whole numbers name one
        if any(isinstance(layer, bool) or not isinstance(layer, int) for layer in self.exit_layers):
            raise ValueError(f"exit_layers must be whole layer numbers, got {self.exit_layers!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        self._check_stem()
        if self.vit_image_size % self.patch_size:
            size = "the stem's output size" if self.stem_channels else "image_size"
            raise ValueError(f"{size} ({self.vit_image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.encoder == "swin":
            self._check_swin()
        self.exit_layers = sorted(set(self.exit_layers))
        bad = [layer for layer in self.exit_layers if not 1 <= layer < self.n_layer]
        if bad:
            raise ValueError(f"exit_layers must lie in 1..{self.n_layer - 1}; got {bad}")

    def _check_stem(self) -> None:
        if not isinstance(self.stem_channels, (list, tuple)):
            raise ValueError(f"stem_channels must be a list of convolution widths, got {self.stem_channels!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.stem_channels):
            raise ValueError(f"stem_channels must be positive integers, got {self.stem_channels}")
        if self.stem_channels and self.encoder != "vit":
            raise ValueError("stem_channels needs the ViT encoder")
        if self.image_size % 2 ** len(self.stem_channels):
            raise ValueError(f"image_size ({self.image_size}) must be divisible by 2 per stem convolution "
                             f"({2 ** len(self.stem_channels)})")
        self.stem_channels = list(self.stem_channels)

    @property
    def vit_image_size(self) -> int:
        """Side of what the ViT's patch embedding sees: the image, or the stem's output."""
        return self.image_size // 2 ** len(self.stem_channels)

    def _check_swin(self) -> None:
        if not isinstance(self.swin_depths, (list, tuple)) or not isinstance(self.swin_heads, (list, tuple)):
            raise ValueError(f"swin_depths and swin_heads must be lists (one entry per stage), got "
                             f"{self.swin_depths!r} and {self.swin_heads!r}")
        stages = len(self.swin_depths)
        if stages < 1 or len(self.swin_heads) != stages:
            raise ValueError(f"swin_depths and swin_heads must name the same stages, got {self.swin_depths} "
                             f"and {self.swin_heads}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in [*self.swin_depths, *self.swin_heads,
                                                                                   self.swin_window]):
            raise ValueError("swin_depths, swin_heads and swin_window must be positive integers")
        grid = self.image_size // self.patch_size
        if grid % (self.swin_window * 2 ** (stages - 1)):
            raise ValueError(f"the patch grid ({grid}) must be a multiple of swin_window x 2^(stages-1) "
                             f"({self.swin_window * 2 ** (stages - 1)})")
        if self.encoder_hidden % 2 ** (stages - 1):
            raise ValueError(f"encoder_hidden ({self.encoder_hidden}) must be divisible by 2^(stages-1)")
        width = self.encoder_hidden // 2 ** (stages - 1)
        for stage, heads in enumerate(self.swin_heads):
            if (width * 2 ** stage) % heads:
                raise ValueError(f"Swin stage {stage + 1} width {width * 2 ** stage} is not divisible by {heads} heads")

    @property
    def encoder_tokens(self) -> int:
        """Image tokens the decoder cross-attends to."""
        if self.encoder == "swin":
            return (self.image_size // (self.patch_size * 2 ** (len(self.swin_depths) - 1))) ** 2
        return (self.vit_image_size // self.patch_size) ** 2 + 1  # + ViT's [CLS]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CapeenConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**data)


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored as (in, out), so HF checkpoints load unchanged."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return flat.view(*x.shape[:-1], flat.shape[-1])


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, n_head*hd) -> (B, n_head, T, hd)."""
    b, t, c = x.shape
    return x.view(b, t, n_head, c // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention over a whole sequence (training and teacher forcing)."""
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        y = F.scaled_dot_product_attention(
            split_heads(q, self.n_head), split_heads(k, self.n_head), split_heads(v, self.n_head), is_causal=True
        )
        return self.c_proj(merge_heads(y))


class CrossAttention(nn.Module):
    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.q_attn = Conv1D(config.n_embd, config.n_embd)
        self.c_attn = Conv1D(config.n_embd, 2 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def encoder_kv(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens, computed once per image and reused for every caption token."""
        k, v = self.c_attn(encoder_states).split(encoder_states.shape[-1], dim=-1)
        return split_heads(k, self.n_head), split_heads(v, self.n_head)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q_attn(x), self.n_head)
        return self.c_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class MLP(nn.Module):
    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.n_inner)
        self.c_proj = Conv1D(config.n_inner, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps)
        self.attn = SelfAttention(config)
        self.ln_cross_attn = nn.LayerNorm(config.n_embd, eps=eps)
        self.crossattention = CrossAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.crossattention(self.ln_cross_attn(x), cross_k, cross_v)
        return x + self.mlp(self.ln_2(x))


class GPT2Decoder(nn.Module):
    """GPT-2 with cross-attention; state-dict compatible with HF `GPT2LMHeadModel(add_cross_attention=True)`."""

    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        # GPT-2 scales residual projections by depth so that the residual stream does not grow with n_layer
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.transformer.wte(tokens) + self.transformer.wpe(positions)

    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.crossattention.encoder_kv(encoder_states) for block in self.transformer.h]

    def hidden_states(
        self, tokens: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Teacher-forced pass; returns the residual stream after every layer (index i = after layer i+1)."""
        x = self.embed(tokens)
        states = []
        for block, (k, v) in zip(self.transformer.h, cross):
            x = block(x, k, v)
            states.append(x)
        return states

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(hidden))


class ExitHead(nn.Module):
    """LayerNorm + linear to the vocabulary: cheap next to a decoder layer (see BENCHMARKS.md)."""

    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.proj = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(hidden))


class ConvStemViT(nn.Module):
    """A transformers ViT behind 3x3 stride-2 convolutions; the ViT's patches are cut from their output."""

    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in config.stem_channels:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.GELU()]
            channels = width
        self.stem = nn.Sequential(*layers)
        self.vit = build_vit(config, image_size=config.vit_image_size, channels=channels)

    def forward(self, pixel_values: torch.Tensor):
        return self.vit(pixel_values=self.stem(pixel_values))

    def fold_batchnorm(self) -> None:
        """Fold each BatchNorm into the convolution before it, for inference (eval mode): the same outputs
        without a pass over every activation. The state dict loses the BatchNorm entries, so save before."""
        layers = list(self.stem)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.BatchNorm2d):
                layers[i - 1], layers[i] = fuse_conv_bn_eval(layers[i - 1], layer), nn.Identity()
        self.stem = nn.Sequential(*layers)


def build_vit(config: CapeenConfig, image_size: int, channels: int) -> ViTModel:
    vit_config = ViTConfig(
        image_size=image_size,
        patch_size=config.patch_size,
        num_channels=channels,
        hidden_size=config.encoder_hidden,
        num_hidden_layers=config.encoder_layers,
        num_attention_heads=config.encoder_heads,
        intermediate_size=config.encoder_intermediate,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTModel(vit_config, add_pooling_layer=False)


def build_encoder(config: CapeenConfig) -> ViTModel | SwinModel | ConvStemViT:
    if config.encoder == "swin":
        stages = len(config.swin_depths)
        swin_config = SwinConfig(
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_channels=3,
            embed_dim=config.encoder_hidden // 2 ** (stages - 1),
            depths=list(config.swin_depths),
            num_heads=list(config.swin_heads),
            window_size=config.swin_window,
            mlp_ratio=config.encoder_intermediate / config.encoder_hidden,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=0.0,
        )
        return SwinModel(swin_config, add_pooling_layer=False)
    if config.stem_channels:
        return ConvStemViT(config)
    return build_vit(config, image_size=config.image_size, channels=3)


class CapeenModel(nn.Module):
    """Image encoder + early-exit decoder. Training uses `forward`; decoding lives in `models.decoding`."""

    def __init__(self, config: CapeenConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        # Same role as VisionEncoderDecoderModel's enc_to_dec_proj: only present when the widths differ.
        self.enc_to_dec_proj = (
            nn.Linear(config.encoder_hidden, config.n_embd)
            if config.encoder_hidden != config.n_embd
            else None
        )
        self.decoder = GPT2Decoder(config)
        self.exits = nn.ModuleDict({str(layer): ExitHead(config) for layer in config.exit_layers})

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.encoder(pixel_values=pixel_values).last_hidden_state
        return self.enc_to_dec_proj(states) if self.enc_to_dec_proj is not None else states

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the exit after 1-based decoder `layer` (the final layer uses ln_f + lm_head)."""
        if layer == self.config.n_layer:
            return self.decoder.final_logits(hidden)
        return self.exits[str(layer)](hidden)

    def forward(
        self, pixel_values: torch.Tensor, tokens: torch.Tensor, captions_per_image: int = 1, with_exits: bool = True
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Teacher-forced logits: (final logits, {exit layer: logits}; empty without `with_exits`).

        `tokens` holds `captions_per_image` captions for each image, grouped by image, so that the encoder and
        the cross-attention keys/values are computed once per image rather than once per caption.
        """
        cross = self.decoder.cross_kv(self.encode(pixel_values))
        if captions_per_image > 1:
            cross = [
                (k.repeat_interleave(captions_per_image, 0), v.repeat_interleave(captions_per_image, 0))
                for k, v in cross
            ]
        states = self.decoder.hidden_states(tokens, cross)
        final = self.decoder.final_logits(states[-1])
        exits = {layer: self.exits[str(layer)](states[layer - 1]) for layer in self.config.exit_layers} \
            if with_exits else {}
        return final, exits

    def init_exits_from_final_head(self) -> None:
        """Start every exit head as a copy of the final one: a much better start than random for stage 2."""
        with torch.no_grad():
            for head in self.exits.values():
                head.ln.load_state_dict(self.decoder.transformer.ln_f.state_dict())
                head.proj.weight.copy_(self.decoder.lm_head.weight)

    def backbone_parameters(self) -> list[nn.Parameter]:
        exit_ids = {id(p) for p in self.exits.parameters()}
        return [p for p in self.parameters() if id(p) not in exit_ids]
