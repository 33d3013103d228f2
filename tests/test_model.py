"""The decoder must be a drop-in GPT-2 (same parameter names, same logits as Hugging Face); the encoder a plain
transformers ViT or Swin."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from models.checkpoint import Checkpoint, Thresholds
from models.decoding import FULL_DEPTH
from models.engine import CaptionEngine
from models.hf_export import hf_pixel_values, to_hf_vision_encoder_decoder
from models.model import CapeenConfig, CapeenModel, GPT2Decoder
from models.tokenizer import SPECIALS, WordTokenizer


def small_config(**overrides) -> CapeenConfig:
    base = dict(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1, encoder_heads=2,
                encoder_intermediate=64, vocab_size=40, n_positions=16, n_embd=32, n_layer=4, n_head=2,
                n_inner=64, exit_layers=[1, 2, 3])
    base.update(overrides)
    return CapeenConfig(**base)


def test_decoder_loads_hf_gpt2_weights_and_matches_its_logits():
    torch.manual_seed(0)
    config = small_config()
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner, add_cross_attention=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    ours = GPT2Decoder(config).eval()
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".masked_bias"))}
    result = ours.load_state_dict(hf_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    tokens = torch.randint(0, config.vocab_size, (3, 9))
    encoder_states = torch.randn(3, 5, config.n_embd)
    with torch.no_grad():
        expected = hf(input_ids=tokens, encoder_hidden_states=encoder_states).logits
        got = ours.final_logits(ours.hidden_states(tokens, ours.cross_kv(encoder_states))[-1])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_exit_logits_come_from_each_layer_and_the_final_layer_uses_lm_head():
    torch.manual_seed(0)
    model = CapeenModel(small_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 40, (4, 6))
    with torch.no_grad():
        final, exits = model(pixels, tokens, captions_per_image=2)
    assert final.shape == (4, 6, 40)
    assert sorted(exits) == [1, 2, 3]
    model.init_exits_from_final_head()
    with torch.no_grad():
        _, exits_after = model(pixels, tokens, captions_per_image=2)
        cross = model.decoder.cross_kv(model.encode(pixels))
        cross = [(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)) for k, v in cross]
        states = model.decoder.hidden_states(tokens, cross)
    # a head copied from the final one gives the final head's logits on the same hidden state
    assert torch.allclose(exits_after[2], model.decoder.final_logits(states[1]), atol=1e-5)


# ----- Swin encoder (the paper's) -------------------------------------------------------------------------------
def swin_config(**overrides) -> CapeenConfig:
    return small_config(encoder="swin", patch_size=4, swin_depths=[1, 1], swin_heads=[1, 2], swin_window=4,
                        **overrides)


def test_swin_encoder_feeds_the_decoder_its_last_stage_tokens_and_exports_to_hugging_face():
    torch.manual_seed(0)
    config = swin_config()
    model = CapeenModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        states = model.encode(pixels)
        final, exits = model(pixels, tokens)
    # 32 px / 4 px patches = 8x8, merged once to 4x4; widths 16 then 32 = n_embd, so no projection
    assert states.shape == (2, config.encoder_tokens, config.n_embd) == (2, 16, 32)
    assert model.enc_to_dec_proj is None
    assert final.shape == (2, 5, 40) and sorted(exits) == [1, 2, 3]

    hf = to_hf_vision_encoder_decoder(model)
    assert type(hf.encoder).__name__ == "SwinModel"
    with torch.no_grad():
        assert torch.allclose(hf.encoder(pixel_values=pixels).last_hidden_state, states, atol=1e-5)


def test_swin_trains_end_to_end():
    torch.manual_seed(0)
    model = CapeenModel(swin_config())
    pixels = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(3, 40, (2, 6))
    final, _ = model(pixels, tokens)
    torch.nn.functional.cross_entropy(final.reshape(-1, 40), tokens.reshape(-1)).backward()
    patch_embedding = model.encoder.embeddings.patch_embeddings.projection.weight
    assert patch_embedding.grad is not None and patch_embedding.grad.abs().sum() > 0


# ----- convolutional stem before the ViT --------------------------------------------------------------------------
def test_conv_stem_feeds_the_vit_and_exports_to_hugging_face_with_the_stem_run_first():
    torch.manual_seed(0)
    config = small_config(stem_channels=[8], patch_size=4)  # 32 px -> 16 px of 8 channels -> 4x4 patches
    model = CapeenModel(config)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(3, 40, (2, 5))
    final, _ = model(pixels, tokens)
    torch.nn.functional.cross_entropy(final.reshape(-1, 40), tokens.reshape(-1)).backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0  # the stem learns with the rest
    model.eval()
    with torch.no_grad():
        states = model.encode(pixels)
        final, _ = model(pixels, tokens)
    assert states.shape == (2, config.encoder_tokens, config.n_embd) == (2, 17, 32)

    hf = to_hf_vision_encoder_decoder(model)
    assert type(hf.encoder).__name__ == "ViTModel" and hf.encoder.config.num_channels == 8
    with torch.no_grad():
        theirs = hf(pixel_values=hf_pixel_values(model, pixels), decoder_input_ids=tokens).logits
    assert torch.allclose(theirs, final, atol=1e-4), (theirs - final).abs().max()
    assert hf_pixel_values(CapeenModel(small_config()), pixels) is pixels  # no stem: the images themselves


def test_the_engine_folds_the_stems_batchnorm_into_its_convolutions_with_the_same_captions(tmp_path):
    torch.manual_seed(0)
    config = small_config(stem_channels=[8, 16], patch_size=4)  # 32 px -> 8 px of 16 channels -> 2x2 patches
    model = CapeenModel(config)
    with torch.no_grad():  # statistics and affine parameters far from their defaults, so that folding shows
        for layer in model.encoder.stem:
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
                layer.weight.uniform_(0.5, 2), layer.bias.uniform_(-1, 1)
    model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode(pixels)
    tokenizer = WordTokenizer([*SPECIALS, *[f"w{i}" for i in range(config.vocab_size - len(SPECIALS))]])
    engine = CaptionEngine(Checkpoint(model=model, tokenizer=tokenizer, thresholds=Thresholds()), device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in engine.model.modules())
    assert torch.allclose(engine.encode(pixels), expected, atol=1e-5)


def test_engines_built_from_one_checkpoint_each_keep_their_own_precision_and_take_empty_batches():
    # a script comparing precisions builds both from one loaded checkpoint: the second must not convert the
    # first one's model under it
    torch.manual_seed(0)
    config = small_config()
    tokenizer = WordTokenizer([*SPECIALS, *[f"w{i}" for i in range(config.vocab_size - len(SPECIALS))]])
    checkpoint = Checkpoint(model=CapeenModel(config).eval(), tokenizer=tokenizer, thresholds=Thresholds(0.5))
    pixels = torch.randn(3, 3, 32, 32)
    exact = CaptionEngine(checkpoint, device="cpu")
    before = [r.trace.token_ids for r in exact.caption_pixels(pixels, 0.5, max_tokens=8).results]

    half = CaptionEngine(checkpoint, device="cpu", dtype=torch.bfloat16)

    assert all(p.dtype == torch.float32 for p in checkpoint.model.parameters())
    assert [r.trace.token_ids for r in exact.caption_pixels(pixels, 0.5, max_tokens=8).results] == before
    assert len(half.caption_pixels(pixels, 0.5, max_tokens=8).results) == 3
    assert all(p.dtype == torch.bfloat16 for p in half.checkpoint.model.parameters())
    assert exact.caption_pixels(pixels[:0], 0.5).results == [] and exact.caption([], 0.5).results == []


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder="swin", patch_size=4, swin_depths=[1, 1], swin_heads=[1, 2], swin_window=4, stem_channels=[8]),
     "needs the ViT"),
    (dict(image_size=36, patch_size=3, stem_channels=[8, 8, 8]), "divisible by 2 per stem convolution"),
    (dict(patch_size=3, stem_channels=[8]), "the stem's output size .16. must be a multiple of patch_size"),
    (dict(stem_channels=[8, 0]), "positive integers"),
    (dict(stem_channels=8), "list of convolution widths"),
    (dict(encoder="resnet"), "encoder must be one of vit, swin"),
    (dict(encoder="swin", patch_size=4, swin_depths=[1, 1], swin_heads=[1]), "same stages"),
    (dict(encoder="swin", patch_size=4, swin_depths=[1, 1], swin_heads=[1, 2], swin_window=3),
     "multiple of swin_window"),
    (dict(encoder="swin", patch_size=4, swin_depths=[1, 1], swin_heads=[1, 3], swin_window=4),
     "not divisible by 3 heads"),
    (dict(encoder="swin", patch_size=4, swin_depths=[0, 1], swin_heads=[1, 2], swin_window=4), "positive integers"),
    (dict(encoder="swin", patch_size=4, swin_depths=2, swin_heads=[1, 2], swin_window=4), "must be lists"),
])
def test_bad_encoder_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_fill", ["deferred", "propagate"])
def test_half_precision_decodes_every_path_and_agrees_with_float32(dtype, kv_fill):
    # What CAPEEN_HALF runs on a GPU, run here on the CPU: a dtype mismatch anywhere in the encoder, the
    # per-layer decode, the exit heads or the filling of skipped layers would fail the first half request.
    torch.manual_seed(0)
    config = small_config(stem_channels=[8, 16], patch_size=4)
    model = CapeenModel(config).eval()
    with torch.no_grad():  # sharper heads, so that tokens really leave at the exits
        for head in model.exits.values():
            head.proj.weight.mul_(5)
    tokenizer = WordTokenizer([*SPECIALS, *[f"w{i}" for i in range(config.vocab_size - len(SPECIALS))]])
    def engine(dtype: torch.dtype | None) -> CaptionEngine:  # each its own copy: an engine casts and folds it
        return CaptionEngine(Checkpoint(model=copy.deepcopy(model), tokenizer=tokenizer,
                                        thresholds=Thresholds(threshold=0.5)), device="cpu", kv_fill=kv_fill, dtype=dtype)

    exact, half = engine(None), engine(dtype)
    assert half.dtype == dtype and all(p.dtype == dtype for p in half.model.parameters())
    half.warmup()

    pixels = torch.randn(6, 3, 32, 32)
    thresholds = [FULL_DEPTH, 0.5, 0.9, 0.0, 0.7, FULL_DEPTH]
    reference = exact.caption_pixels(pixels, thresholds, max_tokens=10).results
    for observe in (False, True):
        results = half.caption_pixels(pixels, thresholds, max_tokens=10, observe_exits=observe).results
        for result, threshold in zip(results, thresholds):
            trace = result.trace
            assert 1 <= len(trace.token_ids) <= 10 and all(0 <= t < config.vocab_size for t in trace.token_ids)
            assert set(trace.exit_layers) <= {*config.exit_layers, config.n_layer}
            assert all(0.0 <= c <= 1.0 for c in sum(trace.exit_confidences, []))
            if threshold == FULL_DEPTH or observe:
                assert set(trace.exit_layers) == {config.n_layer}
    # full depth, where no threshold turns a rounding difference into another exit: the same greedy tokens
    agree = [h.trace.token_ids == r.trace.token_ids for h, r, t in zip(results, reference, thresholds)
             if t == FULL_DEPTH]
    assert all(agree)


def test_a_config_without_exit_layers_puts_an_exit_after_every_layer_but_the_last() -> None:
    """`capeen train --model-config '{"n_layer": 4}'` (the help's example) must not inherit 12 layers' exits."""
    assert CapeenConfig(n_layer=4).exit_layers == [1, 2, 3]
    assert CapeenConfig().exit_layers == list(range(1, 12))
    assert CapeenConfig(n_layer=4, exit_layers=[]).exit_layers == []
    assert CapeenConfig.from_dict({"n_layer": 6, "vocab_size": 30}).exit_layers == [1, 2, 3, 4, 5]
