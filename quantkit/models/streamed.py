"""Loading a model for streaming (--low-memory): its safetensors files read lazily, a meta-device
skeleton with everything outside the decoder layers loaded, one decoder layer materialised at a time,
and checkpoint key names mapped to the model's as transformers maps them."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, auto_class_for, get_module
from quantkit.models.base import Adapter
from quantkit.models.experts import routed_experts, unfused_state


def read_safetensors(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors `keys` (default: all) of a safetensors file, each copied into memory of its own.

    safe_open's tensors are views into a mapping of the whole file, whose touched pages stay
    resident while any of them lives and which an in-place write copies a second time; copied
    out, nothing stays mapped once the file is closed.
    """
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        names = list(handle.keys()) if keys is None else list(keys)
        return {name: handle.get_tensor(name).clone() for name in names}


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file (its header only is read)."""
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


class WeightSource:
    """Lazy access to a model directory's safetensors tensors (single file or sharded index)."""

    def __init__(self, model_dir: str | os.PathLike, stored: dict[str, tuple] | None = None) -> None:
        """`stored` maps each tensor to (shape, dtype, file) where the headers were read already
        (quantkit.models.files.ModelFiles.stored)."""
        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if stored is not None:
            self.where = {key: Path(entry[2]) for key, entry in stored.items()}
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {key: root / fname for key, fname in weight_map.items()}
        elif (root / "model.safetensors").is_file():
            path = root / "model.safetensors"
            self.where = dict.fromkeys(safetensors_keys(path), path)
        else:
            raise QuantkitError(f"--low-memory needs safetensors weights in {root} (model.safetensors or an index)")

        self.stored_name: dict[str, str] = {}  # model name -> name in the files, where they differ
        self.files = dict(self.where)  # name in the files -> its file
        self.conversions: dict[str, Conversion] = {}  # model name -> the conversion that makes it (and its siblings)
        self.model: nn.Module | None = None

    def use_model_names(self, model: nn.Module) -> None:
        """Re-key the tensors by the names `model` gives them, renamed and converted as transformers' loader does
        with checkpoint keys (VLM checkpoints keep legacy layouts: language_model.model.layers...; Ergo's router
        is stored transposed)."""
        names = checkpoint_names_to_model_names(model, list(self.where), self.conversions)
        self.model = model
        converted = {key for conversion in self.conversions.values() for key, _ in conversion.sources}
        self.stored_name = {new: old for old, new in names.items() if new != old and old not in converted}
        # a converted group is listed under the first name it makes (its files: those of its sources)
        self.where = {names[key]: path for key, path in self.where.items()}

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read `keys` from their files (only those tensors are brought into memory, none stays mapped); a key
        made by a load-time conversion brings every tensor its conversion makes."""
        by_file: dict[Path, list[str]] = {}
        plain = [key for key in keys if key not in self.conversions]
        converting = [self.conversions[key] for key in keys if key in self.conversions]
        sources = {source for conversion in converting for source, _ in conversion.sources}
        for key in plain:
            by_file.setdefault(self.where[key], []).append(self.stored_name.get(key, key))
        for source in sources:
            by_file.setdefault(self.files[source], []).append(source)
        model_name = {old: new for new, old in self.stored_name.items()}
        read = {}
        for path, names in by_file.items():
            read.update(read_safetensors(path, names))
        out = {model_name.get(k, k): read.pop(k) for k in [self.stored_name.get(key, key) for key in plain]}
        for conversion in converting:
            out.update(conversion.apply({key: read[key] for key, _ in conversion.sources}, self.model))
        return out


def _fuses_experts(converter) -> bool:
    """Whether a transformers WeightConverter builds a fused experts parameter (experts.gate_up_proj...)."""
    return any(".experts." in f".{p}" for p in converter._original_target_patterns)


class Conversion:
    """One of transformers' load-time weight conversions (a WeightConverter: transposed, fused or split tensors) for
    one group of checkpoint tensors, applied as transformers' loader applies it."""

    def __init__(self, converter, target: str) -> None:
        """`converter` is transformers' template for the family; `target` the model name it makes first."""
        self.converter = converter
        self.target = target
        self.sources: list[tuple[str, str]] = []  # (checkpoint key, the converter's source pattern it matched)

    def apply(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors made from the checkpoint's `tensors` (keyed by checkpoint names)."""
        from transformers.core_model_loading import dot_natural_key

        converter = copy.deepcopy(self.converter)  # it collects tensors: a fresh one per group, as on load
        for key, pattern in sorted(self.sources, key=lambda item: dot_natural_key(item[0])):
            converter.add_tensor(self.target, key, pattern, lambda tensor=tensors[key]: tensor)
        made = converter.convert(self.target, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}


def checkpoint_names_to_model_names(model: nn.Module, keys: Sequence[str],
                                    conversions: dict[str, Conversion] | None = None) -> dict[str, str]:
    """Each checkpoint key -> the model's name for it, as transformers renames them on load. A key that transformers
    also converts (transposed, fused or split) is refused unless `conversions` is given: then it maps to the first
    name its conversion makes, and `conversions` gets that name -> the Conversion of its group of keys."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4.x: a class-level {regex: replacement} map, first match wins
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        out = {}
        for key in keys:
            out[key] = key
            for pattern, replacement in mapping.items():
                renamed, count = re.subn(pattern, replacement, key)
                if count:
                    out[key] = renamed
                    break
        return out
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    # unfused experts have the checkpoint's per-expert tensors: the converters that fuse experts do not apply
    # (the others do: Param2MoE's fused query_key_value)
    unfused = bool(routed_experts(model))
    converters = [t for t in transforms if isinstance(t, WeightConverter) and not (unfused and _fuses_experts(t))]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    state = model.state_dict()
    out = {}
    for key in keys:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if renamed not in state and key in state:  # as transformers loads: a renaming that misses keeps the name
            renamed, converted = key, None  # (DeepSeek-V4's `.norm.` -> `.kv_norm.` also matches model.norm)
        if converted is not None:
            if conversions is None:
                raise QuantkitError(
                    f"--low-memory reads tensors as stored, and {key} needs transformers' conversion on load "
                    "(fused or split weights); run without --low-memory"
                )
            conversions.setdefault(renamed, Conversion(by_pattern[converted], renamed)).sources.append((key, converted))
        out[key] = renamed
    return out


def _set_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, attr = key.rpartition(".")
    module = get_module(root, module_path) if module_path else root
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _meta_tensors(module: nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device but keep real buffers: rotary
    frequencies and position ids are computed when a module is built and are not in the checkpoint.
    A parameter is created uninitialised (its pages never touched) and moved to meta at once, before
    its module initialises it."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(model_dir: str, dtype: str = "auto", files=None) -> tuple[nn.Module, Adapter, WeightSource]:
    """The model on the meta device, with every tensor outside the decoder layers loaded; `files` (a
    quantkit.models.files.ModelFiles of `model_dir`) gives the config and stored tensors already read."""
    config = AutoConfig.from_pretrained(model_dir) if files is None else files.config
    auto_class = auto_class_for(config)
    source = WeightSource(model_dir, None if files is None else files.stored)
    torch_dtype = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with _parameters_on_meta():
        model = auto_class.from_config(config)
    adapter = adapter_for(model)  # fused experts become per-expert linears (on meta), filled layer by layer
    source.use_model_names(model)
    model.eval()
    model.config.use_cache = False
    prefix = adapter.layers + "."
    outside = [k for k in source.where if not k.startswith(prefix)]
    for key, value in source.load(outside).items():
        if key in model.state_dict():
            _set_tensor(model, key, value if torch_dtype is None else value.to(torch_dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        get_module(model, adapter.lm_head).weight = get_module(model, adapter.embeddings).weight
    missing = [n for n in _meta_tensors(model) if not n.startswith(prefix)]
    if missing:
        raise QuantkitError(f"--low-memory: tensors {missing[:5]} are neither in the checkpoint nor rebuildable")
    return model, adapter, source


def load_layer(model: nn.Module, adapter: Adapter, source: WeightSource, index: int, dtype: str = "auto") -> nn.Module:
    """Materialise decoder layer `index` from the files (the others stay on the meta device)."""
    layers = adapter.decoder_layers(model)
    prefix = f"{adapter.layer_prefix(index)}."
    keys = [k for k in source.where if k.startswith(prefix)]
    tensors = {k[len(prefix):]: v for k, v in source.load(keys).items()}
    tensors = unfused_state(layers[index], tensors)  # a checkpoint that keeps experts fused (gpt-oss, Llama 4)
    if dtype != "auto":
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    layer = layers[index]
    layer.load_state_dict(tensors, strict=True, assign=True)
    for param in layer.parameters():
        param.requires_grad_(False)
    if _meta_tensors(layer):
        raise QuantkitError(f"--low-memory: layer {index} has tensors {_meta_tensors(layer)[:5]} not in the checkpoint")
    return layer
