"""A model's shapes for planning, read without its weights: config.json (a meta-device model built from it)
and the safetensors headers."""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError, expect_utf8, one_line, refuse_special_in
from quantkit.models.checks import (
    check_config_values,
    check_full_precision,
    check_language_model,
    config_shape_error,
)
from quantkit.quant.recipe import Recipe
from quantkit.quant.spec import QuantSpec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_HEADER_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass(frozen=True)
class LinearShape:
    """One quantized linear of a decoder layer: its name inside the layer and its width."""

    name: str
    in_features: int
    out_features: int

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]

    def result_bytes(self, group_size: int) -> int:
        """Its quantized codes in memory: a byte per weight, a float32 scale and a byte of zero point per group,
        an int32 g_idx per column."""
        groups = 1 if group_size == -1 else max(1, self.in_features // group_size)
        return self.out_features * self.in_features + self.out_features * groups * 5 + self.in_features * 4


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: its linears in solve groups (the adapter's execution order), its parameter count
    and the widest activation a token has inside it (an MLP's intermediate width)."""

    groups: tuple[tuple[LinearShape, ...], ...]
    params: int
    widest: int
    prefix: str = ""  # the layer's module name in the model ("model.layers.3"): a recipe matches full names

    @property
    def linears(self) -> list[LinearShape]:
        return [lin for group in self.groups for lin in group]

    def inputs(self, group: tuple[LinearShape, ...]) -> list[int]:
        """The input widths of a group's Hessian sums: linears under one parent reading one width share one
        (q/k/v, gate/up, an expert's gate/up), as the engine shares them when they read one tensor."""
        seen: dict[tuple[str, int], int] = {}
        for lin in group:
            seen.setdefault((lin.parent, lin.in_features), lin.in_features)
        return list(seen.values())


@dataclass
class ModelShape:
    """What the planner knows of a model: shapes, parameter counts and bytes, nothing loaded."""

    name: str
    model_type: str
    hidden: int
    vocab: int
    dtype: str  # the dtype the run loads the weights in
    layers: list[LayerShape]
    outside_params: int  # embeddings, final norm, head (a tied head once), vision side
    stored_bytes: int = 0  # the safetensors files (0 when they are not local)
    stored_dtype: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def linear_params(self) -> int:
        return sum(lin.in_features * lin.out_features for layer in self.layers for lin in layer.linears)

    def export_bytes(self, bits: int, group_size: int, recipe: Recipe | None = None, method: str = "gptq") -> int:
        """The export: each quantized linear's codes at its bits (a recipe's, where it gives them) with half its
        results' other bytes (scales, zero points, g_idx); the linears a recipe leaves in full precision and the
        rest of the model in the model's dtype."""
        codes = extra = fp = 0
        spec = QuantSpec(bits=bits, group_size=group_size)
        for layer in self.layers:
            for lin in layer.linears:
                chosen = spec if recipe is None else recipe.settings_for(f"{layer.prefix}.{lin.name}", spec, method)
                if chosen is None:
                    fp += lin.in_features * lin.out_features
                    continue
                chosen = getattr(chosen, "spec", chosen)  # a recipe's LinearSettings
                codes += lin.in_features * lin.out_features * chosen.bits // 8
                extra += lin.result_bytes(chosen.group_size) - lin.in_features * lin.out_features
        return codes + extra // 2 + (self.layer_params - self.linear_params + fp + self.outside_params) * self.dtype_bytes

    def describe(self) -> str:
        first = self.layers[0]
        widths = f"hidden {self.hidden}, widest {first.widest}"
        return (f"{self.model_type}, {len(self.layers)} layers, {widths}, "
                f"{(self.layer_params + self.outside_params) / 1e9:.2f}B parameters in {self.dtype}")


def check_stored_shapes(model: torch.nn.Module, stored: dict[str, dict], name: str) -> None:
    """Each stored tensor the model (built from config.json) has by name has its shape there, as calibrate checks:
    a plan from a config.json the weights contradict plans a run that cannot load."""
    from quantkit.models import adapter_for
    from quantkit.models.streamed import checkpoint_names_to_model_names

    adapter = adapter_for(model)  # fused experts become per-expert linears, as calibrate compares them
    try:
        renamed = checkpoint_names_to_model_names(model, list(stored))
    except QuantkitError:  # weights transformers fuses or splits on load: no one-to-one names to compare
        return
    layers = len(adapter.decoder_layers(model))
    pattern = re.compile(re.escape(adapter.layers) + r"\.(\d+)\.")
    held = {int(m.group(1)) for key in renamed.values() if (m := pattern.match(key))}
    if held and max(held) + 1 != layers:
        raise QuantkitError(f"config.json of {name} names {layers} decoder layers but the checkpoint holds "
                            f"{max(held) + 1}; fix num_hidden_layers or the weights")
    state = model.state_dict()
    for key in sorted(stored):
        target = state.get(renamed[key])
        shape = stored[key].get("shape")
        if target is not None and isinstance(shape, list) and list(target.shape) != shape:
            raise config_shape_error(name, key, shape, target.shape, "the safetensors headers", model.config,
                                     "config.json does not match the weights")


def header(path: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> {dtype, shape, data_offsets} (the file's first bytes only)."""
    try:
        with path.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            meta = json.loads(handle.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise QuantkitError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt") from None
    meta.pop("__metadata__", None)
    return meta


def stored_tensors(root: Path) -> tuple[dict[str, dict], int] | None:
    """Every tensor's header entry in a model directory and the files' total bytes, or None without safetensors."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise QuantkitError(f"{index} is not a valid safetensors index ({err})") from None
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    tensors: dict[str, dict] = {}
    total = 0
    for name in files:
        path = root / name
        if not path.is_file():
            raise QuantkitError(f"{path} is missing; the checkpoint is incomplete")
        tensors.update(header(path))
        total += path.stat().st_size
    return tensors, total


def _local_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    refuse_special_in(path, f"model folder {name}")
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json", "*.json"], local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: the config is fetched below or the error says so
        return None


def read_shape(name: str | os.PathLike, dtype: str = "auto") -> ModelShape:
    """The shapes of the model `name` (a local directory or a hub id with its config cached or reachable)."""
    from transformers import AutoConfig

    from quantkit.models import auto_class_for

    name = os.fspath(name)
    local = _local_dir(name)
    if local is not None:  # calibrate cannot read its safetensors under such a name: no plan of a refused run
        expect_utf8(name, "model path")
    try:
        config = AutoConfig.from_pretrained(str(local) if local is not None else name)
    except Exception as err:  # noqa: BLE001 - a bad or missing config.json raises several types
        raise QuantkitError(f"cannot read the config of {one_line(name)}: {' '.join(str(err).split())[:300]}") from None
    check_full_precision(config, name)  # an export's packed codes are no model to quantize
    check_language_model(config, name)
    check_config_values(config, name)  # what calibrate and --dry-run refuse (rope_theta -1) is no run to plan
    auto_class = auto_class_for(config)
    try:
        with torch.device("meta"):
            model = auto_class.from_config(config)
    except Exception as err:  # noqa: BLE001 - any config inconsistency surfaces here
        raise QuantkitError(f"config.json of {name} does not describe a buildable model: {err}") from None
    stored = stored_tensors(local) if local is not None else None
    if stored is not None:
        check_stored_shapes(model, stored[0], name)
    stored_dtype = None
    if stored is not None:
        counts = Counter(_HEADER_DTYPES[t["dtype"]] for t in stored[0].values() if t["dtype"] in _HEADER_DTYPES)
        stored_dtype = counts.most_common(1)[0][0] if counts else None
    if dtype == "auto":
        configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = stored_dtype or str(configured or "float32").removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise QuantkitError(f"cannot plan for weights in {dtype}; load them as float32, float16 or bfloat16 (--dtype)")
    shape = shape_of(model, name, dtype)
    shape.stored_bytes = stored[1] if stored is not None else 0
    shape.stored_dtype = stored_dtype
    return shape


def shape_of(model: torch.nn.Module, name: str, dtype: str | None = None) -> ModelShape:
    """The shapes of a built model (on the meta device, or loaded: its parameters' dtype unless `dtype`)."""
    from quantkit.models import adapter_for, get_module

    adapter = adapter_for(model)
    config = model.config
    if dtype is None:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise QuantkitError(f"cannot plan for weights in {dtype}; load them as float32, float16 or bfloat16 (--dtype)")
    layers = []
    decoder = adapter.decoder_layers(model)
    for index, layer in enumerate(decoder):
        groups = [tuple(LinearShape(linear, get_module(layer, linear).in_features, get_module(layer, linear).out_features)
                        for linear in group) for group in adapter.linear_groups(index)]
        if not groups:
            raise QuantkitError(f"{name}: decoder layer {index} has no linear that quantkit quantizes")
        params = sum(p.numel() for p in layer.parameters())
        widest = max(lin.out_features for group in groups for lin in group)
        layers.append(LayerShape(tuple(groups), params, widest, adapter.layer_prefix(index)))
    in_layers = {id(p) for p in decoder.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)  # parameters() counts a tied head once
    text = getattr(config, "text_config", None) or config
    return ModelShape(name=name, model_type=config.model_type, hidden=text.hidden_size,
                      vocab=getattr(text, "vocab_size", 0) or 0, dtype=dtype, layers=layers, outside_params=outside)
