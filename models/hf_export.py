"""Our checkpoint as a Hugging Face `VisionEncoderDecoderModel`, built in memory from the same weights.

This is what a user would run without CAPEEN (`model.generate()`), so the benchmark compares against it. The
encoder is already a `transformers` ViT or Swin and the decoder uses GPT-2's parameter names, so the conversion is a
pair of `load_state_dict` calls; it also proves the checkpoint is a plain GPT-2 underneath. A convolutional stem
(`stem_channels`) has no place in `VisionEncoderDecoderModel`: it stays ours, and `hf_pixel_values` runs it on
the images before they go to Hugging Face's ViT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import transformers
from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

from models.model import CapeenModel, ConvStemViT


def to_hf_vision_encoder_decoder(model: CapeenModel) -> VisionEncoderDecoderModel:
    cfg = model.config
    decoder_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.n_inner, layer_norm_epsilon=cfg.layer_norm_epsilon,
        add_cross_attention=True, is_decoder=True, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    encoder = model.encoder.vit if isinstance(model.encoder, ConvStemViT) else model.encoder
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder.config, decoder_config)
    config.decoder_start_token_id = cfg.bos_token_id
    config.pad_token_id = cfg.pad_token_id
    config.eos_token_id = cfg.eos_token_id
    hf = VisionEncoderDecoderModel(config=config)
    missing, unexpected = hf.encoder.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):  # the pooler is unused by captioning
        raise RuntimeError(f"encoder weights do not map onto {type(hf.encoder).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    decoder_state = {k: v for k, v in model.decoder.state_dict().items()}
    missing, unexpected = hf.decoder.load_state_dict(decoder_state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"decoder weights do not map onto GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    if model.enc_to_dec_proj is not None:
        hf.enc_to_dec_proj.load_state_dict(model.enc_to_dec_proj.state_dict())
    hf.generation_config.decoder_start_token_id = cfg.bos_token_id
    hf.generation_config.eos_token_id = cfg.eos_token_id
    hf.generation_config.pad_token_id = cfg.pad_token_id
    weights = next(model.parameters())  # same device and dtype as ours (bf16 when the engine runs in half)
    return hf.to(weights.device, weights.dtype).eval()


def hf_pixel_values(model: CapeenModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the exported model's encoder takes for these images: the images, or our stem's output."""
    if isinstance(model.encoder, ConvStemViT):
        with torch.inference_mode():
            return model.encoder.stem(pixel_values)
    return pixel_values


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off inside the block: its advice on padded text inputs, or on a
    classifier's head left out, reads as an error in a capeen command's output where neither applies."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
