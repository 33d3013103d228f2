"""A local Hugging Face image encoder (ViT or Swin) as the start of a CAPEEN model's encoder.

`capeen train --stage encoder|backbone --encoder-from DIR` reads a folder that `save_pretrained` wrote (a
checkpoint of `ViTModel`, `ViTForImageClassification`, `SwinModel`, ...): `config.json` and `model.safetensors`
(or its shards). Nothing is downloaded and nothing is unpickled: a folder with only `pytorch_model.bin` is
refused. The encoder's architecture becomes the model's (the encoder fields of `CapeenConfig`), so that the
checkpoint written after training rebuilds the same network; a setting `CapeenConfig` cannot express (another
activation, no query bias, another LayerNorm epsilon) is refused rather than silently changed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from capeen.errors import first_line
from models.hf_export import quiet_transformers
from models.model import CapeenConfig, CapeenModel

# the CapeenConfig fields an imported encoder decides
ENCODER_FIELDS = ("encoder", "image_size", "patch_size", "encoder_hidden", "encoder_layers", "encoder_heads",
                  "encoder_intermediate", "swin_depths", "swin_heads", "swin_window", "stem_channels")
# settings of the Hugging Face config that CapeenConfig leaves at transformers' defaults: they must match
_FIXED = {"vit": ("hidden_act", "layer_norm_eps", "qkv_bias", "num_channels"),
          "swin": ("hidden_act", "layer_norm_eps", "qkv_bias", "num_channels", "use_absolute_embeddings")}
# weights of the encoder that captioning leaves out
_UNUSED = ("pooler.",)
# capeen's pixels (models.preprocess): mean 0.5 and std 0.5 in every channel
PIXEL_MEAN = PIXEL_STD = 0.5


class HFImportError(ValueError):
    """A local Hugging Face folder capeen cannot start a model from; the message says why."""


class EncoderImportError(HFImportError):
    """A folder that is not a local Hugging Face ViT or Swin capeen can start from."""


def read_json(path: Path, flag: str = "--encoder-from") -> dict:
    """A JSON object from a save_pretrained folder, or an HFImportError naming the file and the flag."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFImportError(f"{path}: missing ({flag} takes a folder written by save_pretrained)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFImportError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise HFImportError(f"{path}: not a JSON object")
    return data


def hf_config(directory: Path) -> dict:
    """The folder's `config.json`, checked to be a ViT's or a Swin's."""
    if not directory.is_dir():
        raise EncoderImportError(f"{directory}: not a folder (--encoder-from takes a folder written by save_pretrained)")
    config = read_json(directory / "config.json")
    kind = config.get("model_type")
    if kind not in _FIXED:
        raise EncoderImportError(f"{directory}: a {kind or 'model without model_type'} checkpoint; --encoder-from "
                                 f"takes a ViT or a Swin image encoder")
    return config


def config_number(config: dict, key: str, directory: Path, kind: type = int):
    """A number of the folder's config.json: an HFImportError if it is anything else."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and value != int(value)):
        raise HFImportError(f"{directory / 'config.json'}: {key} must be a number, got {value!r}")
    return kind(value)


def encoder_overrides(directory: Path) -> dict:
    """The `CapeenConfig` encoder fields that rebuild the folder's encoder."""
    config = hf_config(directory)
    kind = config["model_type"]
    require_safetensors(directory)  # before a model is built from the config: that may take seconds and gigabytes
    _check_buildable(directory, config)
    fields = {"encoder": kind, "image_size": config_number(config, "image_size", directory),
              "patch_size": config_number(config, "patch_size", directory), "stem_channels": []}
    if kind == "vit":
        fields.update(encoder_hidden=config_number(config, "hidden_size", directory),
                      encoder_layers=config_number(config, "num_hidden_layers", directory),
                      encoder_heads=config_number(config, "num_attention_heads", directory),
                      encoder_intermediate=config_number(config, "intermediate_size", directory))
        return checked_fields(fields, directory)
    depths, heads = config.get("depths"), config.get("num_heads")
    if not (isinstance(depths, list) and isinstance(heads, list) and depths and len(depths) == len(heads)):
        raise EncoderImportError(f"{directory / 'config.json'}: depths and num_heads must be lists of one number "
                                 f"per stage, got {depths!r} and {heads!r}")
    hidden = config_number(config, "embed_dim", directory) * 2 ** (len(depths) - 1)
    intermediate = config_number(config, "mlp_ratio", directory, float) * hidden
    if not math.isclose(intermediate, round(intermediate)):
        raise EncoderImportError(f"{directory / 'config.json'}: mlp_ratio {config['mlp_ratio']} gives a MLP width of "
                                 f"{intermediate:g}, not a whole number")
    fields.update(encoder_hidden=hidden, swin_depths=depths, swin_heads=heads,
                  swin_window=config_number(config, "window_size", directory), encoder_intermediate=round(intermediate))
    return checked_fields(fields, directory)


def require_safetensors(directory: Path) -> None:
    """Refuse a folder whose weights are only pickled (before anything is built from its config), or unreadable
    (which transformers would report as missing)."""
    present = [directory / name for name in ("model.safetensors", "model.safetensors.index.json")
               if (directory / name).is_file()]
    if not present:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise HFImportError(f"{directory}: no model.safetensors" + (
            f" ({', '.join(pickled)} is a pickle, which capeen does not load: convert it with "
            f"save_pretrained(..., safe_serialization=True))" if pickled else ""))
    try:
        with open(present[0], "rb"):
            pass
    except OSError as exc:
        raise HFImportError(f"{present[0]}: unreadable: {first_line(exc)}") from None


def mismatch(info: dict) -> str:
    """The tensors whose shape differs between a folder's weights and its config.json, from transformers'
    loading info."""
    listed = [f"{key} is {list(theirs)} in the weights but {list(ours)} by config.json"
              for key, theirs, ours in sorted(info["mismatched_keys"], key=lambda entry: entry[0])[:3]]
    return f"its weights do not match its config.json: {'; '.join(listed)}"


def checked_fields(fields: dict, directory: Path) -> dict:
    """`fields` (CapeenConfig fields read from the folder's config.json), refused in its name if capeen cannot
    build them, rather than blamed on --model-config later."""
    try:
        CapeenConfig.from_dict(fields)
    except ValueError as exc:
        raise HFImportError(f"{directory / 'config.json'}: {exc}") from None
    return fields


def _check_buildable(directory: Path, config: dict) -> None:
    """Refuse the settings capeen's encoders are not built with (they keep transformers' defaults)."""
    import transformers

    kind = config["model_type"]
    defaults = {"vit": transformers.ViTConfig, "swin": transformers.SwinConfig}[kind]().to_dict()
    for key in _FIXED[kind]:
        if key in config and config[key] != defaults[key]:
            raise EncoderImportError(f"{directory / 'config.json'}: {key} is {config[key]!r}; capeen builds "
                                     f"{kind} encoders with {defaults[key]!r} only")


def _pretrained(directory: Path, kind: str) -> torch.nn.Module:
    """The folder's encoder, loaded by transformers itself (which knows every layout its versions wrote), from
    local safetensors only; pooler, classifier and other heads are left out."""
    import transformers

    require_safetensors(directory)
    model_class = {"vit": transformers.ViTModel, "swin": transformers.SwinModel}[kind]
    try:
        with quiet_transformers():
            # tensors of another shape than the config's are listed in info, rather than named in a log capeen hides
            model, info = model_class.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                      add_pooling_layer=False, output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file, among others
        raise EncoderImportError(f"{directory}: transformers cannot load it: {first_line(exc)}") from None
    missing = [key for key in info.get("missing_keys", ()) if not key.startswith(_UNUSED)]
    if info.get("mismatched_keys"):
        raise EncoderImportError(f"{directory}: {mismatch(info)}")
    if missing:
        raise EncoderImportError(f"{directory}: its weights are not a whole {kind} encoder: missing "
                                 f"{sorted(missing)[:5]}")
    return model


def _normalisation_note(directory: Path) -> str | None:
    """A warning when the encoder was trained on images normalised otherwise than capeen's."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if config.get("do_normalize") is False:
        seen = "pixels in [0, 1], not normalised"
    else:
        mean, std = config.get("image_mean"), config.get("image_std")
        if mean is None or std is None:
            return None
        # one number stands for every channel, as in transformers
        channels = [(v, PIXEL_MEAN) for v in (mean if isinstance(mean, list) else [mean])]
        channels += [(v, PIXEL_STD) for v in (std if isinstance(std, list) else [std])]
        if all(isinstance(v, (int, float)) and math.isclose(v, ours, abs_tol=1e-3) for v, ours in channels):
            return None
        seen = f"pixels normalised with mean {mean} and std {std}"
    return (f"capeen: {directory} was trained on {seen}; capeen feeds it pixels normalised with mean {PIXEL_MEAN} "
            f"and std {PIXEL_STD}, which fine-tuning has to adapt to")


def load_encoder(model: CapeenModel, directory: Path) -> None:
    """Put the folder's encoder weights into `model`, built from `encoder_overrides(directory)`."""
    config = hf_config(directory)
    kind = config["model_type"]
    _check_buildable(directory, config)
    pretrained = _pretrained(directory, kind)
    try:
        model.encoder.load_state_dict(pretrained.state_dict(), strict=True)
    except RuntimeError as exc:  # another transformers layout than the one capeen builds
        raise EncoderImportError(f"{directory}: its weights do not fit capeen's {kind} encoder: "
                                 f"{' '.join(str(exc).split())[:300]}") from None
    note = _normalisation_note(directory)
    if note:
        print(note, file=sys.stderr)
