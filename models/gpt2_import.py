"""A local Hugging Face GPT-2 as the start of a CAPEEN model's decoder (the paper's decoder is GPT-2).

`capeen train --stage encoder|backbone --decoder-from DIR` reads a folder that `save_pretrained` wrote for
`GPT2Model` or `GPT2LMHeadModel` (GPT-2, DistilGPT2, ...): `config.json`, `model.safetensors` and GPT-2's
tokenizer (`tokenizer.json`, or `vocab.json` with `merges.txt`). Nothing is downloaded and nothing is unpickled.

capeen's decoder already has GPT-2's layout (`models.model`), so the blocks, the positions and the final
LayerNorm load as they are; the folder's config sets the decoder's width, heads and MLP, and its first
`n_layer` blocks are taken (all of them unless `--model-config` asks for fewer). What does not carry over is
the vocabulary: capeen's is word-level, built from the training captions. Each word starts at the mean of
GPT-2's embeddings of the tokens GPT-2 writes it with (" dog" is one token, " giraffes" several), which is
also the word's row of the tied output layer; `<bos>` and `<eos>` start at GPT-2's `<|endoftext|>`, `<pad>` and
`<unk>` at the mean of all of GPT-2's embeddings. The cross-attention starts from scratch, unless the folder
has one (a GPT-2 saved with `add_cross_attention`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from capeen.errors import first_line
from models.hf_export import quiet_transformers
from models.hf_import import HFImportError, checked_fields, config_number, mismatch, read_json, require_safetensors
from models.model import CapeenConfig, CapeenModel
from models.tokenizer import BOS, EOS, SPECIALS

FLAG = "--decoder-from"
# the CapeenConfig fields the folder's config fixes; n_layer it only bounds (a model may take fewer blocks)
DECODER_FIELDS = ("n_embd", "n_head", "n_inner", "layer_norm_epsilon")
# GPT-2 settings capeen's decoder is built with: the tanh GELU, attention scaled by 1/sqrt(head size) only
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class DecoderImportError(HFImportError):
    """A folder that is not a local Hugging Face GPT-2 capeen can start its decoder from."""


def gpt2_config(directory: Path) -> tuple[dict, dict]:
    """The folder's `config.json` as written, and over GPT-2's defaults (save_pretrained may leave them out),
    checked to be a GPT-2 that capeen's decoder can rebuild."""
    import transformers

    if not directory.is_dir():
        raise DecoderImportError(f"{directory}: not a folder ({FLAG} takes a folder written by save_pretrained)")
    written = read_json(directory / "config.json", FLAG)
    kind = written.get("model_type")
    if kind != "gpt2":
        raise DecoderImportError(f"{directory}: a {kind or 'model without model_type'} checkpoint; {FLAG} takes a "
                                 f"GPT-2")
    config = {**transformers.GPT2Config().to_dict(), **written}
    activation = config["activation_function"]
    if activation not in _ACTIVATIONS:
        raise DecoderImportError(f"{directory / 'config.json'}: activation_function is {activation!r}; capeen's "
                                 f"decoder uses the tanh GELU ({', '.join(_ACTIVATIONS)})")
    for key, value in _FIXED.items():
        if config[key] != value:
            raise DecoderImportError(f"{directory / 'config.json'}: {key} is {config[key]!r}; capeen's decoder is "
                                     f"built with {value!r} only")
    return written, config


def decoder_overrides(directory: Path) -> dict:
    """The `CapeenConfig` decoder fields that rebuild the folder's GPT-2 (its every block), and as many
    positions as capeen's default where the GPT-2 has that many."""
    _, config = gpt2_config(directory)
    require_safetensors(directory)
    _require_tokenizer(directory)
    n_embd = config_number(config, "n_embd", directory)
    inner = config.get("n_inner")
    positions = min(CapeenConfig.n_positions, config_number(config, "n_positions", directory))
    return checked_fields({
        "n_embd": n_embd, "n_layer": config_number(config, "n_layer", directory),
        "n_head": config_number(config, "n_head", directory),
        "n_inner": 4 * n_embd if inner is None else config_number(config, "n_inner", directory),
        "layer_norm_epsilon": config_number(config, "layer_norm_epsilon", directory, float),
        "n_positions": positions}, directory)


def _require_tokenizer(directory: Path) -> None:
    if not any(all((directory / name).is_file() for name in names) for names in _TOKENIZER_FILES):
        raise DecoderImportError(f"{directory}: no GPT-2 tokenizer (tokenizer.json, or vocab.json and merges.txt): "
                                 f"capeen needs it to give each word of its vocabulary GPT-2's embedding (save the "
                                 f"tokenizer into the same folder)")


def _tokenizer(directory: Path):
    import transformers

    _require_tokenizer(directory)
    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DecoderImportError(f"{directory}: its tokenizer cannot be loaded: {first_line(exc)}") from None
    if not _is_byte_level(tokenizer):  # another tokenizer's ids would give every word an unrelated GPT-2 row
        raise DecoderImportError(f"{directory}: its tokenizer ({type(tokenizer).__name__}) is not GPT-2's byte-level "
                                 f"BPE: the tokenizer is not this model's")
    return tokenizer


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: its class says what it is
        return type(tokenizer).__name__ == "GPT2Tokenizer"
    return "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))


def _pretrained(directory: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The folder's GPT-2 weights (without the cross-attention its config announces but its file lacks), and
    whether the file has an output layer of its own (not tied)."""
    import transformers

    require_safetensors(directory)
    try:
        with quiet_transformers():
            # tensors of another shape than the config's are listed in info, rather than named in a log capeen hides
            model, info = transformers.GPT2Model.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                                 output_loading_info=True,
                                                                 ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file, among others
        raise DecoderImportError(f"{directory}: transformers cannot load it: {first_line(exc)}") from None
    if info.get("mismatched_keys"):
        raise DecoderImportError(f"{directory}: {mismatch(info)}")
    # a config that announces cross-attention the file lacks: it starts from scratch, as it would without
    missing = [key for key in info.get("missing_keys", ()) if not _is_cross_attention(key)]
    unexpected = [key for key in info.get("unexpected_keys", ()) if key not in ("lm_head.weight", "score.weight")]
    if missing or unexpected:
        # blocks or cross-attention the config does not count would be dropped without a word
        raise DecoderImportError(f"{directory}: its weights are not the GPT-2 its config.json describes: missing "
                                 f"{sorted(missing)[:5]}, not in the config {sorted(unexpected)[:5]}")
    initialised = set(info.get("missing_keys", ()))  # by transformers, at random: capeen starts its own
    weights = {key: value for key, value in model.state_dict().items() if key not in initialised}
    return weights, "lm_head.weight" in info.get("unexpected_keys", ())


def _is_cross_attention(key: str) -> bool:
    return ".crossattention." in key or ".ln_cross_attn." in key


def word_embeddings(words: Sequence[str], tokenizer, gpt2_embeddings: torch.Tensor, end_of_text: int
                    ) -> tuple[torch.Tensor, int]:
    """One row per word of capeen's vocabulary, from GPT-2's token embeddings; and how many words GPT-2 writes
    with more than one token."""
    mean = gpt2_embeddings.mean(dim=0)
    rows, split = [], 0
    for word in words:
        if word in (BOS, EOS):
            rows.append(gpt2_embeddings[end_of_text])
        elif word in SPECIALS:
            rows.append(mean)
        else:
            # GPT-2 writes a word inside a sentence with its leading space
            ids = tokenizer.encode(" " + word, add_special_tokens=False)
            if not ids or max(ids) >= len(gpt2_embeddings):
                raise DecoderImportError(f"GPT-2's tokenizer writes {word!r} with ids {ids}, which its "
                                         f"{len(gpt2_embeddings)} embeddings do not cover: the tokenizer is not "
                                         f"this model's")
            split += len(ids) > 1
            rows.append(gpt2_embeddings[ids].mean(dim=0))
    return torch.stack(rows), split


def load_decoder(model: CapeenModel, directory: Path, words: Sequence[str]) -> None:
    """Put the folder's GPT-2 into `model`'s decoder, built with `decoder_overrides(directory)` (and perhaps
    fewer layers); `words` is capeen's vocabulary, in id order."""
    written, config = gpt2_config(directory)
    ours = model.config
    theirs = {"n_layer": config_number(config, "n_layer", directory),
              "n_positions": config_number(config, "n_positions", directory)}
    for key, limit in theirs.items():
        if getattr(ours, key) > limit:
            raise DecoderImportError(f"{key} is {getattr(ours, key)} (--model-config), but the GPT-2 in {directory} "
                                     f"has {limit}")
    tokenizer = _tokenizer(directory)
    source, own_output_layer = _pretrained(directory)
    table = source.pop("wte.weight").float()  # a bf16 file's means are taken in fp32
    if len(tokenizer) > len(table):  # more rows than GPT-2 has is fine: padded tables (50304 for 50257) exist
        raise DecoderImportError(f"{directory}: its tokenizer has {len(tokenizer)} tokens but the model "
                                 f"{len(table)} embeddings: the tokenizer is not this model's")
    end_of_text = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else written.get("eos_token_id")
    if not isinstance(end_of_text, int) or not 0 <= end_of_text < len(table):
        raise DecoderImportError(f"{directory}: no end-of-text token within its embeddings (the tokenizer's "
                                 f"eos_token, or eos_token_id in config.json), got {end_of_text!r}")
    embeddings, split = word_embeddings(words, tokenizer, table, end_of_text)
    state = {"transformer.wte.weight": embeddings}
    for key, value in source.items():
        if key.startswith("h.") and int(key.split(".")[1]) >= ours.n_layer:
            continue
        state["transformer." + key] = value[: ours.n_positions] if key == "wpe.weight" else value
    missing, unexpected = model.decoder.load_state_dict(state, strict=False)
    fresh = [key for key in missing if key != "lm_head.weight"]  # the output layer is tied to the embeddings
    if unexpected or not all(_is_cross_attention(key) for key in fresh):
        raise DecoderImportError(f"{directory}: its weights do not fit capeen's decoder: unexpected "
                                 f"{sorted(unexpected)[:5]}, missing {sorted(fresh)[:5]}")
    cross = "starts from scratch" if fresh else "comes from the folder too"
    untied = "; its own output layer (lm_head) is not used: capeen's is tied to the word embeddings" \
        if own_output_layer else ""
    print(f"capeen: decoder from {directory}: {ours.n_layer} of its {theirs['n_layer']} layers; {split} of the "
          f"{len(words) - len(SPECIALS)} words are several GPT-2 tokens and start at their mean; the "
          f"cross-attention {cross}{untied}", file=sys.stderr)
