"""`capeen train --decoder-from DIR`: a local Hugging Face GPT-2 as the decoder's start (the paper's decoder).

What a user relies on: the GPT-2's blocks, positions and final LayerNorm arrive unchanged, so that without the
cross-attention capeen's decoder computes what GPT-2 computes; each word of capeen's vocabulary starts at
GPT-2's embedding of its tokens; a run resumes without the folder; and a folder capeen cannot start from is
refused in one line before training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_checkpoint
from models.gpt2_import import decoder_overrides, load_decoder, word_embeddings
from models.model import CapeenConfig, CapeenModel
from models.synthetic import generate_dataset
from models.tokenizer import SPECIALS
from tests.test_training import _interrupt_after_first_save, _train, assert_backbone_refused_in_one_line

ENCODER = {"image_size": 32, "patch_size": 8, "encoder_hidden": 32, "encoder_layers": 1, "encoder_heads": 2,
           "encoder_intermediate": 64}
# GPT-2 learns its merges from these, so some of the captions' words are one token and the others several
GPT2_TEXT = "a small large red green blue circle square triangle star and of the left right on image two"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_dataset(out, 24, 8, 4, seed=0, image_size=32, workers=1)
    return out


def _save_gpt2(directory: Path, n_layer: int = 3, rows: int | None = None, **changes):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    words = GPT2_TEXT.split()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))], vocab_size=320,
                            min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end, unk_token=end)
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=rows or len(tokenizer), n_positions=40, n_embd=32, n_layer=n_layer, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **changes)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model, tokenizer = _save_gpt2(directory)
    return directory, model, tokenizer


def _save_wordpiece_tokenizer(directory: Path) -> None:
    """A BERT-style tokenizer in place of GPT-2's: its ids fit the embeddings, but they mean other tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    vocab = {word: i for i, word in enumerate(["[UNK]", "[SEP]", *GPT2_TEXT.split()])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(directory)


def _single_token_words(tokenizer, words):
    return [w for w in words if w not in SPECIALS and len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def test_without_cross_attention_the_decoder_computes_what_gpt2_computes(gpt2, capsys):
    directory, hf, tokenizer = gpt2
    words = [*SPECIALS, *GPT2_TEXT.split(), "giraffes"]
    single = _single_token_words(tokenizer, words)
    assert 3 <= len(single) < len(words) - len(SPECIALS)  # the test means something: both kinds of word occur
    model = CapeenModel(CapeenConfig.from_dict({**ENCODER, **decoder_overrides(directory), "n_positions": 16,
                                                "vocab_size": len(words)})).eval()
    load_decoder(model, directory, words)
    assert "the cross-attention starts from scratch" in capsys.readouterr().err
    with torch.no_grad():
        for block in model.decoder.transformer.h:  # a block with no cross-attention is GPT-2's block
            block.crossattention.c_proj.weight.zero_()
            block.crossattention.c_proj.bias.zero_()
        sentence = single[:5]
        ours_ids = torch.tensor([[words.index("<bos>"), *(words.index(w) for w in sentence)]])
        end = tokenizer.eos_token_id
        their_ids = torch.tensor([[end, *(tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in sentence)]])
        cross = model.decoder.cross_kv(torch.randn(1, 17, 32))
        ours = model.decoder.final_logits(model.decoder.hidden_states(ours_ids, cross)[-1])
        theirs = hf(input_ids=their_ids).logits
        columns = [words.index("<eos>"), *(words.index(w) for w in single)]
        their_columns = [end, *(tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in single)]
    torch.testing.assert_close(ours[..., columns], theirs[..., their_columns], rtol=0, atol=1e-5)


def test_a_word_of_several_gpt2_tokens_starts_at_their_mean(gpt2):
    directory, hf, tokenizer = gpt2
    table = hf.transformer.wte.weight.detach()
    words = [*SPECIALS, "red", "giraffes"]
    rows, split = word_embeddings(words, tokenizer, table, tokenizer.eos_token_id)
    pieces = tokenizer.encode(" giraffes", add_special_tokens=False)
    assert len(pieces) > 1 and split == 1
    torch.testing.assert_close(rows[5], table[pieces].mean(dim=0))
    torch.testing.assert_close(rows[1], table[tokenizer.eos_token_id])  # <bos> and <eos>: GPT-2's end of text
    torch.testing.assert_close(rows[0], table.mean(dim=0))  # <pad> and <unk>: no word in particular


def test_train_decoder_from_starts_from_the_gpt2_and_resumes_without_it(data, gpt2, tmp_path, monkeypatch, capsys):
    directory, hf, _ = gpt2
    copy = tmp_path / "gpt2"
    shutil.copytree(directory, copy)
    # --lr 0: the checkpoint holds the starting weights; two of GPT-2's three layers
    common = ["--stage", "backbone", "--decoder-from", copy, "--steps", 2, "--lr", 0, "--warmup", 0, "--eval-every", 1,
              "--model-config", json.dumps({**ENCODER, "n_layer": 2, "n_positions": 24})]
    with monkeypatch.context() as m:
        _interrupt_after_first_save(m)
        assert _train(data, tmp_path / "out", tmp_path / "run", *common) == 130
    err = capsys.readouterr().err
    assert f"decoder from {copy}: 2 of its 3 layers" in err and "starts from scratch" in err
    shutil.rmtree(copy)  # the run state holds the decoder: the folder is not needed again
    assert _train(data, tmp_path / "out", tmp_path / "run", *common, "--resume") == 0

    model = load_checkpoint(tmp_path / "out").model
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head, model.config.n_inner,
            model.config.exit_layers) == (32, 2, 2, 128, [1])
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = hf.state_dict()
    for key in ("h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight", "ln_f.bias"):
        torch.testing.assert_close(weights["decoder.transformer." + key], theirs["transformer." + key])
    torch.testing.assert_close(weights["decoder.transformer.wpe.weight"], theirs["transformer.wpe.weight"][:24])
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["training"]["backbone"]["decoder_from"] == str(copy)


def test_decoder_from_refuses_what_it_cannot_start_from_in_one_line(data, gpt2, tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    directory = gpt2[0]
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(tmp_path / "vit")
    _save_gpt2(tmp_path / "relu", activation_function="relu")
    shutil.copytree(directory, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no-tokenizer" / name).unlink()
    shutil.copytree(directory, tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    _save_gpt2(tmp_path / "few-rows", rows=100)
    shutil.copytree(directory, tmp_path / "wordpiece")
    _save_wordpiece_tokenizer(tmp_path / "wordpiece")
    for name, change in (("n_inner-64", {"n_inner": 64}), ("n_head-3", {"n_head": 3})):
        shutil.copytree(directory, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **change}))
    shutil.copytree(directory, tmp_path / "damaged")
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    small = json.dumps(ENCODER)
    cases = [
        (["--decoder-from", tmp_path / "vit"], "a vit checkpoint; --decoder-from takes a GPT-2"),
        (["--decoder-from", tmp_path / "relu"], "activation_function is 'relu'; capeen's decoder uses the tanh GELU"),
        (["--decoder-from", tmp_path / "no-tokenizer"], "no GPT-2 tokenizer (tokenizer.json, or vocab.json and "
                                                        "merges.txt)"),
        (["--decoder-from", tmp_path / "pickled"], "pytorch_model.bin is a pickle, which capeen does not load"),
        (["--decoder-from", tmp_path / "damaged", "--model-config", small], "transformers cannot load it"),
        (["--decoder-from", tmp_path / "missing"], "not a folder"),
        (["--decoder-from", ""], "--decoder-from is empty (an unset shell variable?)"),
        (["--decoder-from", tmp_path / "few-rows", "--model-config", small],
         "its tokenizer has 320 tokens but the model 100 embeddings: the tokenizer is not this model's"),
        (["--decoder-from", tmp_path / "wordpiece"], "is not GPT-2's byte-level BPE"),
        (["--decoder-from", tmp_path / "n_inner-64", "--model-config", small],
         "its weights do not match its config.json: h.0.mlp.c_fc.bias is [128] in the weights but [64] by config.json"),
        (["--decoder-from", tmp_path / "n_head-3"], "n_head-3/config.json: n_embd (32) must be a multiple of n_head"),
        (["--decoder-from", directory, "--model-config", json.dumps({"n_embd": 64})],
         "--model-config cannot set n_embd: the --decoder-from decoder's config fixes it"),
        (["--decoder-from", directory, "--model-config", json.dumps({**ENCODER, "n_layer": 4})],
         "n_layer is 4 (--model-config), but the GPT-2 in"),
        (["--decoder-from", directory, "--model-config", json.dumps({**ENCODER, "n_positions": 41})],
         "n_positions is 41 (--model-config), but the GPT-2 in"),
        (["--decoder-from", directory, "--init", directory], "--decoder-from starts a new model's decoder; --init"),
    ]
    assert_backbone_refused_in_one_line(data, tmp_path, capsys, cases)


def _load(directory: Path, words) -> CapeenModel:
    model = CapeenModel(CapeenConfig.from_dict({**ENCODER, **decoder_overrides(directory), "vocab_size": len(words)}))
    load_decoder(model, directory, words)
    return model


def test_a_gpt2_saved_with_cross_attention_brings_it(tmp_path, capsys):
    hf, _ = _save_gpt2(tmp_path / "gpt2", add_cross_attention=True)
    model = _load(tmp_path / "gpt2", [*SPECIALS, "red", "circle"])
    assert "the cross-attention comes from the folder too" in capsys.readouterr().err
    theirs = hf.transformer.h[2].crossattention.q_attn.weight
    torch.testing.assert_close(model.decoder.transformer.h[2].crossattention.q_attn.weight, theirs)


def test_what_the_folder_has_but_capeen_does_not_use_is_said(tmp_path, capsys):
    """A config that announces cross-attention its file lacks: capeen's own starts from scratch, not the random
    one transformers would make up. An untied output layer is dropped, and said to be."""
    _save_gpt2(tmp_path / "gpt2", tie_word_embeddings=False)
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "add_cross_attention": True}))
    torch.manual_seed(5)
    model = _load(tmp_path / "gpt2", [*SPECIALS, "red", "circle"])
    err = capsys.readouterr().err
    assert "the cross-attention starts from scratch" in err
    assert "its own output layer (lm_head) is not used" in err
    torch.manual_seed(5)
    fresh = CapeenModel(model.config)  # the same seed: capeen's own initialisation of the cross-attention
    torch.testing.assert_close(model.decoder.transformer.h[1].crossattention.q_attn.weight,
                               fresh.decoder.transformer.h[1].crossattention.q_attn.weight)
