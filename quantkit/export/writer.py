"""Writing quantkit checkpoints in every export format: one writer, whatever the model's size.

A checkpoint directory holds config.json, safetensors weights (one file or shards with
model.safetensors.index.json), quantkit.json (format, spec, module lists) and, by format:
what the format adds (GPTQ: quantize_config.json; fake: quantkit_qparams.safetensors, the scales,
zeros and g_idx that turn the stored dequantized weights back into exact codes). Everything that
differs between formats is asked of the Format objects in quantkit.export.formats.

_write encodes a model given as pieces (FP tensors and results): a model in memory is one piece kept in
memory (write_checkpoint, save_quantized), a low-memory run's model a piece per decoder layer spooled to disk
(write_checkpoint_streamed); both lay out the same files, byte for byte.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.export.card import CARD, model_card
from quantkit.export.common import (
    MANIFEST,
    REPORT,
    SOURCE_FILES,
    VERSION,
    Checkpoint,
    ExportPlan,
    Layout,
    build_plan,
    check_result,
    float_dtype,
    write_json,
)
from quantkit.export.experts import dense_fused_experts
from quantkit.export.formats import Format, format_for
from quantkit.export.spool import DiskSpool, MemorySpool, parse_size, write_sharded
from quantkit.fsutil import atomic_dir
from quantkit.models.base import get_module
from quantkit.models.conv1d import checkpoint_layout, transposed_linears
from quantkit.models.experts import checkpoint_key, checkpoint_module
from quantkit.quant.spec import QuantResult, QuantSpec

logger = logging.getLogger(__name__)

# (FP tensors, quantized results) of one piece of a model
Part = tuple[dict[str, torch.Tensor], dict[str, QuantResult]]


def save_quantized(
    model: torch.nn.Module,
    results: dict[str, QuantResult],
    out_dir: str | os.PathLike,
    *,
    fmt: str = "gptq",
    spec: QuantSpec | None = None,
    source: str | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    processor: object | None = None,
) -> Path:
    """Write `model` with `results` replacing its quantized linears, in format `fmt`; `spec` is the run's solver
    settings (damp, static groups, activation bits: what the format's config declares); `processor` (a tokenizer
    or processor) is saved beside it with save_pretrained, else `source`'s files are copied. Results may differ in
    (bits, group_size, sym, act_order) per linear; the format declares each."""
    format_for(fmt)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    extra_files: dict[str, str | bytes] = {}
    gen = getattr(model, "generation_config", None)
    if gen is not None and source is None:
        try:
            extra_files["generation_config.json"] = gen.to_json_string()
        except Exception:  # noqa: BLE001 - a generation config is optional
            pass
    linear_order, n_blocks = _layout(model)
    fp, fp_linears = _fp_state(model, results), _fp_linears(model, results)
    fp, results = dense_fused_experts(model, fp, results)
    # a model with unfused experts is written with the family's checkpoint names (Mixtral's block_sparse_moe)
    key, module = checkpoint_key(model), checkpoint_module(model)
    fp = {key(k): t for k, t in fp.items()}
    results = {module(n): r for n, r in results.items()}
    # FP linears by the model's own names: loaders match the ignore list against the model they build
    layout = Layout(linear_order, n_blocks, tuple(fp_linears), renamed_linears(model, module),
                    tuple(module(n) for n in transposed_linears(model)))
    ckpt = Checkpoint(config=config, manifest={}, fp_tensors=fp, results=results, layout=layout)
    return write_checkpoint(ckpt, out_dir, fmt=fmt, spec=spec, source=source, report=report, overwrite=overwrite,
                            max_shard_size=max_shard_size, extra_files=extra_files, processor=processor)


def write_checkpoint(
    ckpt: Checkpoint,
    out_dir: str | os.PathLike,
    *,
    fmt: str,
    spec: QuantSpec | None = None,
    source: str | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    extra_files: dict[str, str | bytes] | None = None,
    processor: object | None = None,
) -> Path:
    """Encode a Checkpoint held in memory in `fmt` and write it atomically to out_dir: the writer over one piece.
    Without `spec`, a checkpoint read back keeps its own solver settings (quantkit.json's spec)."""
    if spec is None and ckpt.manifest.get("spec"):
        spec = spec_of_manifest(ckpt.manifest)
    layout = ckpt.layout if ckpt.layout is not None else Layout.from_manifest(ckpt.manifest)
    return _write(ckpt.config, [(ckpt.fp_tensors, ckpt.results)], out_dir, fmt=fmt, spec=spec, layout=layout,
                       source=source, report=report, overwrite=overwrite, max_shard_size=max_shard_size,
                       extra_files=extra_files, processor=processor)


def write_checkpoint_streamed(config: dict, parts: Iterable[Part], out_dir: str | os.PathLike, *, fmt: str,
                              spec: QuantSpec | None = None, layout: Layout | None = None, source: str | None = None,
                              report: dict | None = None, overwrite: bool = False,
                              max_shard_size: int | str = "5GB") -> Path:
    """The writer for a model that does not fit in memory: `parts` yields (FP tensors, results) a piece at a time
    (the non-layer tensors, then one decoder layer per piece), each encoded, spooled to disk and dropped; memory
    stays at about one piece whatever the number of pieces."""
    return _write(config, parts, out_dir, fmt=fmt, spec=spec, layout=layout, source=source, report=report,
                       overwrite=overwrite, max_shard_size=max_shard_size, spool_to_disk=True)


def spec_of_manifest(manifest: dict) -> QuantSpec:
    """The solver settings quantkit.json recorded (what a converted checkpoint's config declares again)."""
    spec = manifest.get("spec") or {}
    act_bits = spec.get("act_bits")
    return QuantSpec(damp=float(spec.get("damp", 0.01)), static_groups=bool(spec.get("static_groups", False)),
                     act_bits=None if act_bits is None else int(act_bits))


def _write(config: dict, parts: Iterable[Part], out_dir: str | os.PathLike, *, fmt: str,
                spec: QuantSpec | None = None, layout: Layout | None = None, source: str | None = None,
                report: dict | None = None, overwrite: bool = False, max_shard_size: int | str = "5GB",
                extra_files: dict[str, str | bytes] | None = None, processor: object | None = None,
                spool_to_disk: bool = False) -> Path:
    """The one writer: encode each piece's results in `fmt`, lay out the shards, write config.json, quantkit.json,
    the format's files, the report and the model card, and the source's tokenizer (or `processor`), atomically."""
    spec = spec or QuantSpec(static_groups=False)
    layout = layout or Layout()
    format_ = format_for(fmt).with_act_bits(spec.act_bits)
    limit = parse_size(max_shard_size)
    with atomic_dir(out_dir, overwrite) as tmp:
        tensors, sidecar = (DiskSpool(tmp / ".spool" / "model"), DiskSpool(tmp / ".spool" / "qparams")) if spool_to_disk \
            else (MemorySpool(), MemorySpool())
        stubs, fp_names, fp_dtype = _encode(parts, format_, tensors, sidecar, set(layout.transposed))
        plan = build_plan(stubs, fp_linears=layout.fp_linears, damp=spec.damp, static_groups=spec.static_groups,
                          linear_order=layout.linear_order, n_blocks=layout.n_blocks, act_bits=format_.act_bits,
                          model_names=layout.model_names)
        format_.check_plan(plan)
        names = dict(plan.model_names)
        format_.check_family(lambda: _meta_model(config), {names.get(n, n): s.bits for n, s in plan.settings.items()})
        tensors.add(format_.plan_tensors(plan, tensors.shape))
        write_sharded(tensors, tmp, limit)
        if sidecar.keys:
            sidecar.write_file(sidecar.keys, tmp / format_.sidecar)
        shutil.rmtree(tmp / ".spool", ignore_errors=True)
        config, qc, manifest = _config_and_manifest(config, format_, plan, fp_names, fp_dtype, layout.transposed)
        _write_metadata(tmp, format_, config, qc, manifest, report, source)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
        if processor is not None:
            processor.save_pretrained(str(tmp))
        elif source is not None:
            _copy_source_files(source, tmp)
    return Path(out_dir)


def _meta_model(config: dict) -> torch.nn.Module | None:
    """The model transformers' Auto class builds from the export's config.json (a causal LM or an image-text model,
    as quantkit loads it), on the meta device; None where it builds none."""
    import transformers

    from quantkit.models import auto_class_for

    fields = dict(config)
    try:
        built = transformers.AutoConfig.for_model(fields.pop("model_type", None), **fields)
        with torch.device("meta"):
            return auto_class_for(built).from_config(built)
    except Exception:  # noqa: BLE001 - a config transformers cannot build is not this check's to refuse
        return None


def _encode(parts: Iterable[Part], format_: Format, tensors: MemorySpool | DiskSpool,
            sidecar: MemorySpool | DiskSpool, transposed: set[str]) -> tuple[dict[str, QuantResult], list[str], torch.dtype]:
    """Encode every piece into the spools (a dense weight of a `transposed` linear in its checkpoint's [in, out]);
    return metadata stubs of the results (settings and g_idx, for the plan), the FP tensors' names and the model's
    float dtype."""
    stubs: dict[str, QuantResult] = {}
    fp_names: list[str] = []
    fp_dtype: torch.dtype | None = None
    for fp, results in parts:
        if fp_dtype is None and any(t.is_floating_point() for t in fp.values()):
            fp_dtype = float_dtype(fp)
        encoded = dict(fp)
        side: dict[str, torch.Tensor] = {}
        for name, r in results.items():
            check_result(name, r)
            format_.check(name, r)
            if f"{name}.weight" in fp:
                raise QuantkitError(f"{name} is quantized but its FP weight is also present; this is a bug")
            if name in transposed:
                format_.check_conv1d(name)
            tensors_of, side_of = format_.encode(name, r, fp_dtype or torch.float32)
            if name in transposed and format_.stores_dense_weights:
                tensors_of[f"{name}.weight"] = checkpoint_layout(tensors_of[f"{name}.weight"])
            encoded.update(tensors_of)
            side.update(side_of)
            empty = torch.empty(0, 0)
            stubs[name] = replace(r, qweight=empty, scales=empty, zeros=empty, g_idx=r.g_idx.clone())
        fp_names.extend(fp)
        tensors.add(encoded)
        sidecar.add(side)
        del encoded, side, fp, results
    fp_set = set(fp_names)
    for name in stubs:
        if f"{name}.weight" in fp_set:
            raise QuantkitError(f"{name} is quantized but its FP weight is also present; this is a bug")
    return stubs, fp_names, fp_dtype or torch.float32


def _config_and_manifest(source_config: dict, fmt: Format, plan: ExportPlan, fp_names: list[str],
                         fp_dtype: torch.dtype, transposed: tuple[str, ...] = ()) -> tuple[dict, dict | None, dict]:
    """config.json with the format's quantization_config, that config alone, and quantkit.json."""
    config = dict(source_config)
    config.pop("quantization_config", None)
    qc = fmt.quantization_config(plan)
    if qc is not None:
        config["quantization_config"] = qc
    manifest = {
        "quantkit_version": VERSION,
        "format": fmt.name,
        "spec": plan.spec(),
        "module_specs": {n: s.to_dict() for n, s in plan.overrides().items()},
        "quantized_modules": sorted(plan.settings),
        "fp_modules": sorted({k.rsplit(".", 1)[0] for k in fp_names}),
        "fp_linears": list(plan.fp_linears),
        "linear_order": list(plan.linear_order) if plan.linear_order else None,
        "n_blocks": plan.n_blocks,
        "dtype": str(fp_dtype).replace("torch.", ""),
    }
    if plan.model_names:
        manifest["model_names"] = dict(plan.model_names)
    if transposed:
        manifest["transposed"] = sorted(transposed)
    return config, qc, manifest


def _write_metadata(out: Path, fmt: Format, config: dict, qc: dict | None, manifest: dict, report: dict | None,
                    source: str | None = None) -> None:
    """config.json, the format's own config files, quantkit.json, the report and the model card."""
    write_json(out / "config.json", config)
    for fname, content in fmt.config_files(qc).items():
        write_json(out / fname, content)
    write_json(out / MANIFEST, manifest)
    if report is not None:
        write_json(out / REPORT, report)
    # a source name holding bytes that are not UTF-8 (a Latin-1 file name) is written escaped: the card stays UTF-8
    (out / CARD).write_text(model_card(manifest, report, source, config), encoding="utf-8", errors="backslashreplace")


def _copy_source_files(source: str, out: Path) -> None:
    """The source's tokenizer or processor saved by its own save_pretrained (so the export holds what
    transformers loads, in the installed version's layout), plus its generation config; where
    transformers cannot load one, the source's files are copied as they are."""
    processor = _load_source_processor(source)
    if processor is None:
        _copy_files(source, out, SOURCE_FILES)
        return
    processor.save_pretrained(str(out))
    _copy_files(source, out, ("generation_config.json",))


def _load_source_processor(source: str):
    """The processor (a tokenizer for text models) transformers builds from `source`, or None."""
    from transformers import AutoProcessor

    path = Path(source).expanduser()
    try:  # a hub id: only what the local cache holds (the model itself was read from it), no network
        return AutoProcessor.from_pretrained(str(path) if path.is_dir() else source, local_files_only=not path.is_dir())
    except Exception as err:  # noqa: BLE001 - a source without a loadable tokenizer still exports
        logger.debug("no tokenizer or processor loads from %r (%s); copying its files", source, err)
        return None


def _copy_files(source: str, out: Path, names: tuple[str, ...]) -> None:
    src = Path(source).expanduser()
    if src.is_dir():
        for fname in names:
            if (src / fname).is_file():
                shutil.copy2(src / fname, out / fname)
        return
    try:  # a hub id: only what the local cache already holds (no network needed)
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(source, allow_patterns=list(names), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - tokenizer files are a convenience
        logger.warning("could not copy tokenizer/processor files from %r: %s", source, err)
        return
    for fname in names:
        if (local / fname).is_file():
            shutil.copy2(local / fname, out / fname)


def _fp_state(model: torch.nn.Module, results: dict[str, QuantResult]) -> dict[str, torch.Tensor]:
    """The model's state dict without tied duplicates and without the quantized linears' weights."""
    state = model.state_dict()
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied to an earlier tensor (e.g. lm_head to the embeddings)
        seen[ident] = key
        out[key] = t.detach().cpu()
    for name, r in results.items():
        key = f"{name}.weight"
        if key not in state:
            raise QuantkitError(f"quantized module {name} has no weight in the model; check the result names")
        shape = tuple(get_module(model, name).weight.shape)  # a Conv1D's state dict holds it transposed
        if shape != tuple(r.qweight.shape):
            raise QuantkitError(f"{name}: result shape {tuple(r.qweight.shape)} does not match the weight {shape}")
        if key not in out:
            raise QuantkitError(f"{name}: its weight is tied to another tensor; tied weights cannot be quantized")
        del out[key]
    return out


def renamed_linears(model: torch.nn.Module, module: Callable[[str], str]) -> tuple[tuple[str, str], ...]:
    """(checkpoint name, model name) of the model's linears that `module` renames (Layout.model_names)."""
    return tuple(sorted((module(n), n) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and module(n) != n))


def _fp_linears(model: torch.nn.Module, results: dict[str, QuantResult]) -> list[str]:
    """Names of the nn.Linear modules kept in full precision (lm_head, vision tower, skipped ones)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in results)


def _layout(model: torch.nn.Module) -> tuple[tuple[str, ...] | None, int | None]:
    try:
        from quantkit.models import adapter_for

        adapter = adapter_for(model)
        return tuple(adapter.sub_names()), len(adapter.decoder_layers(model))
    except Exception:  # noqa: BLE001 - layout hints are optional
        return None, None
