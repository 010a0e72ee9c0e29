"""Which model and tokenizer a token-level calibration set was made on (model type, architectures, layer count,
config hash, a fingerprint of a few weights, the tokenizer's hash), and the check that a model is that one."""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, source_name

# Config keys that do not change the model's function (bookkeeping, dtype, runtime flags).
_CONFIG_HASH_IGNORED = {
    "_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict", "architectures",
}


def config_hash(model_or_config) -> str:
    """sha256 of the model config without bookkeeping keys (paths, versions, dtype, runtime flags)."""
    config = getattr(model_or_config, "config", model_or_config)

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if k not in _CONFIG_HASH_IGNORED}
        return value

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# rows x columns of each tensor sampled into a set's weights fingerprint
_FINGERPRINT_ROWS = 8
_FINGERPRINT_COLUMNS = 8


def _fingerprint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a weights fingerprint samples: the input embedding, and the first and last decoder layers'
    first matrix (models of one config differ in all of them; a fine-tune at least in the layers)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    embedding = model.get_input_embeddings()
    tied = [name for name, p in params.items() if embedding is not None and p is embedding.weight]
    picked = {tied[0]: params[tied[0]]} if tied else {}
    adapter = adapter_for(model)
    count = len(adapter.decoder_layers(model))
    for index in sorted({0, count - 1}) if count else ():
        prefix = adapter.layer_prefix(index) + "."
        first = next((name for name, p in params.items() if name.startswith(prefix) and p.dim() == 2), None)
        if first is not None:
            picked[first] = params[first]
    return picked


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """A fixed grid of a matrix's values (rows spread over its length, its first columns), as stored."""
    rows = torch.linspace(0, tensor.shape[0] - 1, min(_FINGERPRINT_ROWS, tensor.shape[0])).round().long()
    return tensor.detach()[rows][:, :_FINGERPRINT_COLUMNS].flatten().cpu()


def weights_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """{tensor: a few of its values} of the model's embedding and first and last decoder layers: cheap, and
    enough to tell two models of one config apart (the config hash cannot)."""
    return {name: _sample(p).float().tolist() for name, p in _fingerprint_tensors(model).items()
            if p.device.type != "meta" and p.dim() == 2}


def differing_weight(recorded: dict[str, list[float]], model: nn.Module) -> str | None:
    """The first fingerprinted tensor whose values in `model` differ from `recorded` (the set's, taken in
    float32: cast to the model's dtype first), or None; tensors `model` does not hold in memory are skipped."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, values in sorted(recorded.items()):
        param = params.get(name)
        if param is None:
            return name
        if param.device.type == "meta":
            continue  # --low-memory: the decoder layers are read later, one at a time
        mine = _sample(param)
        if mine.numel() != len(values) or not torch.equal(torch.tensor(values, dtype=torch.float32).to(mine.dtype), mine):
            return name
    return None


def model_identity(model: nn.Module) -> dict:
    """What a set records of the model it was made on: model type, architectures, layer count, config hash."""
    config = model.config
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_layers": len(adapter_for(model).decoder_layers(model)),
        "config_hash": config_hash(model),
    }


def check_set_matches(manifest: dict, model: nn.Module, tokenizer=None, where: str = "", model_name: str = "") -> None:
    """Refuse a set made for another model (architecture, layer count, config, weights) or another tokenizer."""
    found = model_identity(model)
    if manifest.get("model_type") != found["model_type"] or manifest.get("architectures") != found["architectures"]:
        raise QuantkitError(
            f"calibration set {where} was made for {manifest.get('model_type')} {manifest.get('architectures')}, "
            f"not this {found['model_type']} {found['architectures']}; make a set for this model"
        )
    if manifest.get("num_layers") != found["num_layers"]:
        raise QuantkitError(
            f"calibration set {where} has weights for {manifest.get('num_layers')} layers, the model has {found['num_layers']}; make a set for this model"
        )
    if manifest.get("config_hash") != found["config_hash"]:
        raise QuantkitError(
            f"calibration set {where} was made for another model config ({manifest.get('model')}: config hash differs); make a set for this model"
        )
    recorded = manifest.get("weights_fingerprint")
    if recorded is None:
        logging.getLogger(__name__).warning(
            "calibration set %s predates weights fingerprints: that it was made on this model's weights (not only its "
            "config) is not checked; rebuild it with `quantkit importance` to have it checked", where)
    elif not isinstance(recorded, dict) or not recorded or not all(isinstance(v, list) for v in recorded.values()):
        raise QuantkitError(f"calibration set {where} is corrupt: its weights_fingerprint is not a table of values "
                            f"({'empty' if recorded in ({}, []) else type(recorded).__name__}); remake it with "
                            "`quantkit importance`")
    else:
        differing = differing_weight(recorded, model)
        if differing is not None:
            mine = model_name or source_name(model)
            raise QuantkitError(f"calibration set {where} was made on {manifest.get('model')}, whose weights are not "
                                f"those of {mine} ({differing} differs; the configs match); rebuild the set with "
                                f"`quantkit importance` on {mine}")
    if tokenizer is not None and manifest.get("tokenizer_hash") not in (None, tokenizer_hash(tokenizer)):
        raise QuantkitError(f"calibration set {where} was tokenized with a different tokenizer; remake it with this model's tokenizer")
