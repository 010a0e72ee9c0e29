"""Reading quantkit checkpoints back, in any export format: FP tensors and the exact quantized results."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.errors import QuantkitError, expect_path, expect_utf8, one_line, refuse_special_in
from quantkit.export.common import (
    INDEX,
    MANIFEST,
    SINGLE,
    Checkpoint,
    StoredTensors,
    check_result,
    manifest_settings,
)
from quantkit.export.formats import format_for
from quantkit.models.checks import nonfinite_counts, stored_twice, where_in_model
from quantkit.models.experts import model_key, routed_experts, unfuse_experts
from quantkit.quant.spec import QuantResult
from quantkit.readers import check_generation_config, read_json_object


def is_quantkit_output(path: str | os.PathLike) -> bool:
    """Whether a directory is a quantkit export (it has quantkit.json)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def check_export_dir(path: str | os.PathLike) -> None:
    """A quantkit output's safetensors headers are readable (its tensors are checked when read)."""
    from quantkit.models.files import read_header

    for file in sorted(Path(path).glob("*.safetensors")):
        read_header(file)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a quantkit output (any format) back into FP tensors and exact QuantResults."""
    root = Path(expect_path("read_checkpoint(path)", path))
    expect_utf8(root, "the quantkit output")
    if not root.is_dir():
        raise QuantkitError(f"{one_line(root)} is not a directory; give a quantkit output directory")
    refuse_special_in(root, "the quantkit output")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise QuantkitError(f"{one_line(root)} is not a quantkit output (no {MANIFEST}); export it with quantkit first")
    manifest = read_json(mpath)
    config = read_json(root / "config.json")
    check_generation_config(root)  # a re-export copies it as it is
    declared = config.pop("quantization_config", None)
    name = manifest.get("format")
    try:
        fmt = format_for(name)
    except QuantkitError:
        raise QuantkitError(f"{mpath} names unknown format {name!r}") from None
    settings = manifest_settings(manifest, mpath)
    _check_layout_fields(manifest, config, mpath)
    act_bits = (manifest.get("spec") or {}).get("act_bits") if isinstance(manifest.get("spec"), dict) else None
    fmt = fmt.with_act_bits(act_bits)  # what the config must declare for the inputs
    model_names = manifest.get("model_names")
    fmt.check_declared(declared, settings, str(root), model_names if isinstance(model_names, dict) else None)
    tensors = _load_tensors(root)
    sidecar = _read_safetensors(root / fmt.sidecar) if fmt.sidecar else {}
    check_finite_tensors(root, {**tensors, **sidecar})
    stored = StoredTensors(root, tensors, sidecar)
    results: dict[str, QuantResult] = {}
    if fmt.stores_dense_weights:  # a Conv1D's dense weight is stored [in, out]: its result is the linear's
        for module in set(manifest.get("transposed") or ()) & set(settings):
            if f"{module}.weight" in stored.tensors:
                stored.tensors[f"{module}.weight"] = stored.tensors[f"{module}.weight"].t()
    for module, setting in settings.items():
        try:
            r = fmt.decode(module, stored, setting)
            check_result(module, r)
        except QuantkitError as err:
            raise QuantkitError(f"{root}: {module}'s stored tensors do not fit the {setting.bits}-bit g{setting.group_size} "
                                f"setting quantkit.json gives it ({err}); the export is inconsistent, export it again") from None
        results[module] = r
    stray = sorted(k for k in sidecar if k.rpartition(".")[0] not in results)
    if stray:
        raise QuantkitError(f"{root / fmt.sidecar}: tensor {stray[0]} belongs to no quantized linear of quantkit.json; "
                            "the export is damaged or was edited, export it again")
    ckpt = Checkpoint(config=config, manifest=manifest, fp_tensors=stored.tensors, results=results, path=root)
    check_tensors(ckpt)
    return ckpt


def check_finite_tensors(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every float tensor an export stores (weights, scales) is finite: an inf weight_scale dequantizes to inf
    weights that a re-export writes on and a loaded model computes with, and the integer codes beside it cannot
    show it; refused by tensor and layer, as a model's own non-finite weights are."""
    for name in sorted(tensors):
        tensor = tensors[name]
        counts = nonfinite_counts(tensor) if tensor.is_floating_point() else ""
        if not counts:
            continue
        raise QuantkitError(f"{root}: tensor {name} ({where_in_model(name)}) holds {counts} value(s) among its "
                            f"{tensor.numel()}; the export is damaged or was edited: export it again from the model")


FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _check_layout_fields(manifest: dict, config: dict, mpath: Path) -> None:
    """quantkit.json's n_blocks (the decoder layers the export's config builds) and dtype (of its full-precision
    tensors) are what the export holds: a re-export copies them into its own quantization_config and manifest, so an
    edited value would be carried on without a word."""
    blocks = manifest.get("n_blocks")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    layers = config.get("num_hidden_layers", text.get("num_hidden_layers"))
    if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool)
                               or (isinstance(layers, int) and blocks != layers)):
        raise QuantkitError(f"{mpath}: n_blocks is {blocks!r}, and the export's config.json builds {layers} decoder "
                            "layers; the export is damaged or was edited, export it again")
    dtype = manifest.get("dtype")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise QuantkitError(f"{mpath}: dtype is {dtype!r}, not one of {', '.join(FLOAT_DTYPES)} (the export's full-"
                            "precision tensors); the export is damaged or was edited, export it again")


def build_model(config: dict, path: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model an export's config.json describes (its architectures' class, else a causal LM),
    built on the current device (meta for names and shapes only)."""
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise QuantkitError(f"{Path(path) / 'config.json'} has no model_type")
    try:
        built = transformers.AutoConfig.for_model(model_type, **cfg)
    except Exception as err:  # noqa: BLE001
        raise QuantkitError(f"cannot build a {model_type!r} config from {path}: {err}") from err
    arch = (cfg.get("architectures") or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    kwargs = {} if dtype is None else {"dtype": dtype}
    if model_cls is not None:
        return model_cls._from_config(built, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(built, **kwargs)


def model_name(config: dict) -> str:
    """The class (else the model type) an export's config.json names."""
    return (config.get("architectures") or [None])[0] or str(config.get("model_type"))


def check_tensors(ckpt: Checkpoint) -> None:
    """Every tensor of an export is a quantized linear's or a parameter or buffer of the model its config.json
    describes (built on the meta device), in the shape that config makes it: a stray tensor is named (transformers
    would drop it silently), and so is a config field that lies about a stored shape (vocab_size 80 over 64 rows)."""
    from quantkit.models.checks import config_shape_error

    with torch.device("meta"):
        model = build_model(ckpt.config, ckpt.path)
    rename = model_key(model) if unfuse_experts(model) else (lambda key: key)
    state = model.state_dict(keep_vars=True)
    # experts written dense in the fused layout (quantkit.export.experts): the names unfused_state splits
    known_fused = {f"{name}.{k}{bias}" for name, experts in routed_experts(model)
                   for k in experts.layout.fused_names() for bias in ("", "_bias")}
    transposed = set(ckpt.manifest.get("transposed") or ())
    shapes = {name: tuple(t.shape) for name, t in ckpt.fp_tensors.items()}
    for module, r in ckpt.results.items():  # a result is [out, in]; a Conv1D's model weight [in, out]
        shapes[f"{module}.weight"] = tuple(r.qweight.shape)[:: -1 if module in transposed else 1]
    for name in sorted(shapes):
        key = rename(name)
        if key not in state and key not in known_fused:
            raise QuantkitError(f"{ckpt.path}: tensor {name} does not belong to a {model_name(ckpt.config)} model; "
                                "the export is damaged or was edited, export it again")
        if key in state and tuple(state[key].shape) != shapes[name]:
            raise config_shape_error(str(ckpt.path), name, shapes[name], state[key].shape, "the export", ckpt.config,
                                     "config.json does not match the stored tensors (edited?): export it again")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or a QuantkitError saying the checkpoint is incomplete or broken."""
    return read_json_object(path, "the checkpoint is incomplete or broken; export it again")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise QuantkitError(f"{path} is missing; the checkpoint is incomplete")
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = f.get_tensor(k)
        return out
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QuantkitError(f"{path} is not a readable safetensors file ({msg}); it may be truncated or corrupt") from err


def _load_tensors(root: Path) -> dict[str, torch.Tensor]:
    index = root / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise QuantkitError(f"{index} has no weight_map; re-export the checkpoint")
        tensors: dict[str, torch.Tensor] = {}
        held: dict[str, str] = {}
        for fname in sorted(set(weight_map.values())):
            shard = _read_safetensors(root / fname)
            for key in shard:
                if key in held:
                    raise stored_twice(index, key, held[key], fname, weight_map.get(key))
                held[key] = fname
            tensors.update(shard)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise QuantkitError(f"{index} lists {missing[0]} but no shard holds it; the checkpoint is incomplete")
        return tensors
    return _read_safetensors(root / SINGLE)
