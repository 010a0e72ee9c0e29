"""The token-level calibration set on disk: samples, masks, TLQ weights and scores in two safetensors
files plus manifest.json (format, model and tokenizer identity, settings, file hashes); saving it
atomically, and loading it after checking that it fits the model."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from quantkit.engine.weights import LayerWeights
from quantkit.errors import QuantkitError, one_line
from quantkit.fsutil import atomic_dir, file_sha256
from quantkit.importance.identity import (
    check_set_matches,
    model_identity,
    tokenizer_hash,
    weights_fingerprint,
)
from quantkit.importance.weights import TokenImportance, check_manifest_fields
from quantkit.version import __version__

SET_FORMAT = "quantkit.tlq-calibration-set"
SET_FORMAT_VERSION = 1
# weights.safetensors key prefix of per-linear weights: f"linear.{layer}.{name}" -> [samples, Tmax, groups]
LINEAR_KEY = "linear"
# weights.safetensors key prefix of output-side factors: f"output_side.{layer}.{name}" -> [blocks, b, b] (GPTQ's row
# metric; quantkit.importance.gradients, output_side)
FACTOR_KEY = "output_side"
SAMPLES_FILE = "samples.safetensors"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


# ----------------------------------------------------------------------------- the set on disk


def save_calibration_set(
    output: str | Path,
    samples: Sequence[dict],
    importance: TokenImportance,
    model: nn.Module,
    model_name: str,
    tokenizer=None,
    *,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write samples, masks, weights, scores and manifest.json to `output` atomically; return the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    for i, sample in enumerate(samples):
        for key, value in sample.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
    lengths = torch.tensor([m.numel() for m in importance.valid], dtype=torch.long)
    tmax = int(lengths.max())

    def pad(masks: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(masks), tmax, dtype=torch.bool)
        for i, m in enumerate(masks):
            out[i, : m.numel()] = m
        return out

    weights = {
        "weights": importance.stacked("weights"),
        "scores": importance.stacked("scores"),
        "lengths": lengths,
        "valid_mask": pad(importance.valid),
        "scored_positions": pad(importance.scored),
        "vision_mask": pad(importance.vision),
    }
    for layer, by_linear in enumerate(importance.linear_weights or []):
        for name, per_sample in by_linear.items():
            groups = importance.linear_groups.get(name, 1)
            padded = torch.zeros(len(per_sample), tmax, groups)
            for index, value in enumerate(per_sample):
                padded[index, : value.shape[0]] = value.float().reshape(value.shape[0], groups)
            weights[f"{LINEAR_KEY}.{layer}.{name}"] = padded
    for layer, by_linear in enumerate(importance.linear_factors or []):
        for name, factor in by_linear.items():
            weights[f"{FACTOR_KEY}.{layer}.{name}"] = factor.contiguous()
    revision = getattr(model.config, "_commit_hash", None)
    manifest = {
        "format": SET_FORMAT,
        "format_version": SET_FORMAT_VERSION,
        "quantkit_version": __version__,
        "model": model_name,
        "revision": revision,
        **model_identity(model),
        "weights_fingerprint": weights_fingerprint(model),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "nsamples": len(samples),
        "max_tokens": tmax,
        "sample_keys": sorted({k for s in samples for k, v in s.items() if isinstance(v, torch.Tensor)}),
        "settings": importance.settings,
        "report": importance.report,
        **(extra or {}),
    }
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / SAMPLES_FILE)
        save_file(weights, tmp / WEIGHTS_FILE)
        manifest["files"] = {name: file_sha256(tmp / name) for name in (SAMPLES_FILE, WEIGHTS_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(setdir: str | Path) -> dict:
    """The manifest of a calibration set, or a QuantkitError if the directory is missing or not a set."""
    root = Path(setdir)
    if not root.is_dir():
        raise QuantkitError(f"calibration set {one_line(root)} not found; make one with `quantkit importance MODEL --calib "
                            f"DATA -o {one_line(root)}`")
    path = root / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise QuantkitError(f"{one_line(root)} is not a calibration set (no {MANIFEST_FILE}); make one with `quantkit importance`") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuantkitError(f"{path} is corrupt ({err}); remake the set with `quantkit importance`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SET_FORMAT:
        raise QuantkitError(f"{path} is not a quantkit calibration-set manifest")
    if manifest.get("format_version") != SET_FORMAT_VERSION:
        raise QuantkitError(f"calibration set {root} has format version {manifest.get('format_version')}; this quantkit reads {SET_FORMAT_VERSION}")
    return check_manifest_fields(manifest, path)


def set_counts(setdir: str | Path) -> dict[str, int]:
    """How many samples a set holds and its longest sample's tokens ({"nsamples", "seqlen"}), as its manifest records
    them where they are positive whole numbers: what a run on it plans for before anything loads. A missing or broken
    set gives what it can ({} at worst): read_manifest refuses it in the preflight."""
    try:
        manifest = json.loads((Path(setdir) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    counts = {"nsamples": manifest.get("nsamples"), "seqlen": manifest.get("max_tokens")} if isinstance(manifest, dict) else {}
    return {key: value for key, value in counts.items() if type(value) is int and value > 0}


def _check_files(root: Path, manifest: dict) -> None:
    for name, digest in (manifest.get("files") or {}).items():
        path = root / name
        if not path.is_file():
            raise QuantkitError(f"calibration set {root} is incomplete: {name} is missing; remake it")
        if file_sha256(path) != digest:
            raise QuantkitError(f"calibration set {root} is corrupt: {name} does not match its sha256 in the manifest; remake it")
    for name in (SAMPLES_FILE, WEIGHTS_FILE):
        if name not in (manifest.get("files") or {}):
            raise QuantkitError(f"calibration set {root} is corrupt: manifest lists no hash for {name}")


class StoredWeights:
    """token_weights(layer) over a loaded set: each sample's weights cut to its length."""

    def __init__(self, weights: torch.Tensor, lengths: torch.Tensor, manifest: dict,
                 linear: dict[int, dict[str, torch.Tensor]] | None = None,
                 factors: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
        self.weights = weights
        self.lengths = [int(n) for n in lengths]
        self.manifest = manifest
        self.floor = (manifest.get("settings") or {}).get("lam")
        self.linear = linear or {}  # {layer: {name: [samples, Tmax, groups]}}
        self.factors = factors or {}  # output-side factors: {layer: {name: [blocks, b, b]}}

    @property
    def num_layers(self) -> int:
        """Number of decoder layers the weights cover."""
        return int(self.weights.shape[0])

    def __call__(self, layer: int) -> list[torch.Tensor] | LayerWeights:
        """One weight tensor [T] per sample for decoder layer `layer` (LayerWeights with per-linear weights or
        output-side factors)."""
        output = [self.weights[layer, i, :n] for i, n in enumerate(self.lengths)]
        if layer not in self.linear and layer not in self.factors:
            return output
        linears, groups = {}, {}
        for name, value in self.linear.get(layer, {}).items():
            groups[name] = int(value.shape[2])
            linears[name] = [value[i, :n, 0] if groups[name] == 1 else value[i, :n] for i, n in enumerate(self.lengths)]
        return LayerWeights(output, linears, groups, self.floor, dict(self.factors.get(layer, {})))


def load_calibration_set(setdir: str | Path, model_name: str | None, model: nn.Module, tokenizer=None) -> tuple[list[dict], StoredWeights]:
    """(samples, token_weights) of a set made by `quantkit importance`, after checking it fits `model`.

    The tokenizer check uses `tokenizer`, or the one at `model_name` when that loads.
    """
    root = Path(setdir)
    manifest = read_manifest(root)
    _check_files(root, manifest)
    if tokenizer is None and model_name is not None and manifest.get("tokenizer_hash"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name)
        except (OSError, ValueError) as err:
            raise QuantkitError(f"cannot load the tokenizer of {model_name} to check calibration set {root}: {str(err).splitlines()[0]}") from err
    check_set_matches(manifest, model, tokenizer, where=str(root), model_name=model_name or "")
    try:
        tensors = load_file(root / SAMPLES_FILE)
        weights = load_file(root / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise QuantkitError(f"calibration set {root} is corrupt: {err}; remake it") from err
    from quantkit.models.checks import embedding_rows

    def corrupt(what: str) -> QuantkitError:
        return QuantkitError(f"calibration set {root} is corrupt: {what}; remake it with `quantkit importance`")

    samples = _read_samples(tensors, manifest, embedding_rows(model), corrupt)
    layers = int(manifest["num_layers"])
    token_weights, linear = _read_weights(weights, [int(s["input_ids"].shape[1]) for s in samples], layers, corrupt)
    factors = _read_factors(weights, layers, corrupt)
    return samples, StoredWeights(token_weights, weights["lengths"], manifest, linear, factors)


def _by_layer(weights: dict[str, torch.Tensor], prefix: str, layers: int, corrupt) -> dict[int, dict[str, torch.Tensor]]:
    """The tensors of weights.safetensors named f"{prefix}.LAYER.NAME", as {layer: {name: tensor}}; any other
    name under `prefix`, or a layer not below `layers`, refused."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if key.startswith(prefix + "."):
            layer, _, name = key.removeprefix(prefix + ".").partition(".")
            if not re.fullmatch(r"0|[1-9][0-9]*", layer) or int(layer) >= layers or not name:
                raise corrupt(f"{WEIGHTS_FILE} holds {key!r}, not '{prefix}.LAYER.NAME' of a layer below {layers}")
            found.setdefault(int(layer), {})[name] = value
    return found


def _read_factors(weights: dict[str, torch.Tensor], layers: int, corrupt) -> dict[int, dict[str, torch.Tensor]]:
    """The output-side factors of weights.safetensors ({layer: {name: [blocks, b, b]}}), checked."""
    found = _by_layer(weights, FACTOR_KEY, layers, corrupt)
    for layer, named in found.items():
        for name, value in named.items():
            key = f"{FACTOR_KEY}.{layer}.{name}"
            if not _real(value) or value.dim() != 3 or value.shape[1] != value.shape[2] or 0 in value.shape:
                raise corrupt(f"{key!r} is {str(value.dtype).removeprefix('torch.')} {list(value.shape)}, not "
                              "[blocks, b, b] numbers")
            if not bool(torch.isfinite(value).all()) or bool((torch.diagonal(value, dim1=1, dim2=2) < 0).any()):
                raise corrupt(f"{key!r} holds a non-finite value or a negative diagonal")
            named[name] = value.double()
    return found


def _brief(values: Sequence) -> str:
    """A list shown whole when short, else its first entries and its length."""
    values = list(values)
    return str(values) if len(values) <= 6 else f"[{', '.join(map(str, values[:4]))}, ... ({len(values)} entries)]"


def _whole_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _real(tensor: torch.Tensor) -> bool:
    """A tensor of real numbers (not bool, not complex)."""
    return tensor.dtype != torch.bool and not tensor.is_complex()


def _read_samples(tensors: dict[str, torch.Tensor], manifest: dict, rows: int | None, corrupt) -> list[dict]:
    """The samples of samples.safetensors ("{index}.{field}" keys), each field one the manifest lists, indexes
    0..nsamples-1 each holding one row of token ids of the model's embedding."""
    count, listed = manifest.get("nsamples"), manifest.get("sample_keys")
    if not _whole_count(count):
        raise corrupt(f"its manifest counts {count!r} samples")
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise corrupt(f"its manifest's sample_keys ({listed!r}) is not a list of field names")
    samples: list[dict] = [{} for _ in range(count)]
    for name, value in sorted(tensors.items()):
        index, _, key = name.partition(".")
        if not re.fullmatch(r"0|[1-9][0-9]*", index) or not key:
            raise corrupt(f"{SAMPLES_FILE} holds {name!r}, not a 'SAMPLE.FIELD' name")
        if int(index) >= count:
            raise corrupt(f"{SAMPLES_FILE} holds {name} but the manifest counts {count} samples (0..{count - 1})")
        if key not in listed:
            raise corrupt(f"{SAMPLES_FILE} holds {name}, a field the manifest's sample_keys {listed} do not name")
        samples[int(index)][key] = value
    for index, sample in enumerate(samples):
        ids = sample.get("input_ids")
        if ids is None:
            raise corrupt(f"sample {index} has no input_ids")
        if not _real(ids) or ids.is_floating_point():
            raise corrupt(f"sample {index}'s input_ids are {str(ids.dtype).removeprefix('torch.')}, not token ids")
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise corrupt(f"sample {index}'s input_ids are {list(ids.shape)}, not one row of tokens [1, T]")
        if int(ids.min()) < 0 or (rows is not None and int(ids.max()) >= rows):
            raise corrupt(f"sample {index}'s input_ids are not token ids of the model's {rows}-row embedding")
    return samples


def _read_weights(weights: dict[str, torch.Tensor], tokens: list[int], layers: int, corrupt
                  ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """(token weights [layers, samples, >= T] as float, per-linear weights {layer: {name: tensor}}) of
    weights.safetensors, after checking them against the samples' token counts: every 'lengths' entry a sample's
    T, weights finite, not negative, and some token of every layer weighing more than zero."""
    for key in ("weights", "lengths"):
        if key not in weights:
            raise corrupt(f"{WEIGHTS_FILE} has no {key!r}")
    lengths, stored = weights["lengths"], weights["weights"]
    if not _real(lengths) or lengths.dim() != 1 or lengths.tolist() != tokens:
        shown = _brief(lengths.tolist()) if lengths.dim() == 1 else f"a {list(lengths.shape)} tensor"
        raise corrupt(f"its 'lengths' {shown} are not the samples' token counts {_brief(tokens)}")
    linear = _by_layer(weights, LINEAR_KEY, layers, corrupt)
    named = {"weights": stored, **{f"{LINEAR_KEY}.{layer}.{name}": value
                                   for layer, by_name in linear.items() for name, value in by_name.items()}}
    for key, value in named.items():
        shape = list(value.shape)
        if key == "weights":
            ok = value.dim() == 3 and shape[:2] == [layers, len(tokens)] and shape[2] >= max(tokens)
            expected = f"[{layers} layers, {len(tokens)} samples, >= {max(tokens)} tokens]"
        else:
            ok = value.dim() == 3 and shape[0] == len(tokens) and shape[1] >= max(tokens) and shape[2] >= 1
            expected = f"[{len(tokens)} samples, >= {max(tokens)} tokens, groups]"
        if not ok:
            raise corrupt(f"{key!r} is {shape}, not {expected}")
        if not _real(value):
            raise corrupt(f"{key!r} is {str(value.dtype).removeprefix('torch.')}, not numbers")
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise corrupt(f"{key!r} holds a negative or non-finite weight")
    token_weights = stored.float()
    within = torch.arange(token_weights.shape[2]) < torch.tensor(tokens)[:, None]  # [samples, T]: each one's tokens
    counted = (token_weights.gt(0) & within).flatten(1).any(1)
    if not bool(counted.all()):
        layer = int((~counted).nonzero()[0])
        raise corrupt(f"'weights' of layer {layer} are zero for every token: no token would count")
    return token_weights, {layer: {name: value.float() for name, value in by_name.items()}
                           for layer, by_name in linear.items()}
