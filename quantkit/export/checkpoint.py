"""Writing and reading quantkit checkpoints in every export format.

A checkpoint directory holds config.json, safetensors weights (one file or shards with
model.safetensors.index.json), quantkit.json (format, spec, module lists) and, by format:
what the format adds (GPTQ: quantize_config.json; fake: quantkit_qparams.safetensors, the scales,
zeros and g_idx that turn the stored dequantized weights back into exact codes). Everything that
differs between formats is asked of the Format objects in quantkit.export.formats.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from quantkit.errors import QuantkitError
from quantkit.export.card import CARD, model_card
from quantkit.export.common import (
    VERSION,
    ExportPlan,
    StoredTensors,
    build_plan,
    check_result,
    manifest_settings,
)
from quantkit.export.formats import Format, format_for
from quantkit.fsutil import atomic_dir
from quantkit.models.experts import (
    checkpoint_key,
    checkpoint_module,
    fuse_experts,
    model_key,
    unfuse_experts,
)
from quantkit.quant.spec import QuantResult

logger = logging.getLogger(__name__)

MANIFEST = "quantkit.json"
REPORT = "quantkit_report.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# tokenizer / processor / generation files copied from the source model
SOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    """A quantkit checkpoint in memory: FP tensors, exact quantized results and metadata."""

    config: dict  # config.json without quantization_config
    manifest: dict
    fp_tensors: dict[str, torch.Tensor]
    results: dict[str, QuantResult]
    path: Path | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- writing


def save_quantized(
    model: torch.nn.Module,
    results: dict[str, QuantResult],
    out_dir: str | os.PathLike,
    *,
    fmt: str = "gptq",
    source: str | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    processor: object | None = None,
) -> Path:
    """Write `model` with `results` replacing its quantized linears, in format `fmt`; `processor` (a
    tokenizer or processor) is saved beside it with save_pretrained, else `source`'s files are copied.
    Results may differ in (bits, group_size, sym, act_order) per linear; the format declares each."""
    format_for(fmt)
    limit = parse_size(max_shard_size)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    fp = _fp_state(model, results)
    extra_files: dict[str, str | bytes] = {}
    gen = getattr(model, "generation_config", None)
    if gen is not None and source is None:
        try:
            extra_files["generation_config.json"] = gen.to_json_string()
        except Exception:  # noqa: BLE001 - a generation config is optional
            pass
    linear_order, n_blocks = _layout(model)
    fp_linears = _fp_linears(model, results)
    # a model with unfused experts is written with the family's checkpoint names (Mixtral's block_sparse_moe)
    key, module = checkpoint_key(model), checkpoint_module(model)
    fp = {key(k): t for k, t in fp.items()}
    results = {module(n): r for n, r in results.items()}
    fp_linears = [module(n) for n in fp_linears]
    ckpt = Checkpoint(config=config, manifest={}, fp_tensors=fp, results=results)
    ckpt.extra = {"linear_order": linear_order, "n_blocks": n_blocks, "fp_linears": fp_linears}
    return write_checkpoint(
        ckpt, out_dir, fmt=fmt, source=source, report=report, overwrite=overwrite,
        max_shard_size=limit, extra_files=extra_files, processor=processor,
    )


def _config_and_manifest(source_config: dict, fmt: Format, plan: ExportPlan, fp_names,
                         fp_dtype: torch.dtype) -> tuple[dict, dict | None, dict]:
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
    return config, qc, manifest


def _write_metadata(out: Path, fmt: Format, config: dict, qc: dict | None, manifest: dict, report: dict | None,
                    source: str | None = None) -> None:
    """config.json, the format's own config files, quantkit.json, the report and the model card."""
    _write_json(out / "config.json", config)
    for fname, content in fmt.config_files(qc).items():
        _write_json(out / fname, content)
    _write_json(out / MANIFEST, manifest)
    if report is not None:
        _write_json(out / REPORT, report)
    (out / CARD).write_text(model_card(manifest, report, source), encoding="utf-8")


def _solver_settings(report: dict | None, prev_spec: dict) -> tuple[float, bool]:
    """damp and static_groups for the config: the run's report, else the checkpoint being converted."""
    report_spec = (report or {}).get("spec", {}) if isinstance((report or {}).get("spec"), dict) else {}
    damp = float(report_spec.get("damp", prev_spec.get("damp", 0.01)))
    static_groups = bool(report_spec.get("static_groups", prev_spec.get("static_groups", False)))
    return damp, static_groups


def _act_bits(report: dict | None, prev_spec: dict) -> int | None:
    """The activation bits of the model being written: the run's report, else the checkpoint being converted."""
    report_spec = (report or {}).get("spec", {}) if isinstance((report or {}).get("spec"), dict) else {}
    bits = report_spec.get("act_bits", prev_spec.get("act_bits"))
    return None if bits is None else int(bits)


def write_checkpoint(
    ckpt: Checkpoint,
    out_dir: str | os.PathLike,
    *,
    fmt: str,
    source: str | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    extra_files: dict[str, str | bytes] | None = None,
    processor: object | None = None,
) -> Path:
    """Encode a Checkpoint in `fmt` and write it atomically to out_dir (with `processor`, a tokenizer or
    processor, saved by its own save_pretrained)."""
    act_bits = _act_bits(report, ckpt.manifest.get("spec", {}) if ckpt.manifest else {})
    format_ = format_for(fmt).with_act_bits(act_bits)
    limit = parse_size(max_shard_size)
    results = ckpt.results
    # Validate everything before touching the output path.
    for name, r in results.items():
        check_result(name, r)
        format_.check(name, r)
    damp, static_groups = _solver_settings(report, ckpt.manifest.get("spec", {}) if ckpt.manifest else {})
    extra = ckpt.extra or {}
    plan = build_plan(
        results, fp_linears=extra.get("fp_linears") or ckpt.manifest.get("fp_linears", []), damp=damp,
        static_groups=static_groups, linear_order=extra.get("linear_order") or ckpt.manifest.get("linear_order"),
        n_blocks=extra.get("n_blocks") or ckpt.manifest.get("n_blocks"), act_bits=act_bits,
    )
    format_.check_plan(plan)
    fp_dtype = _float_dtype(ckpt.fp_tensors)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in ckpt.fp_tensors.items():
        tensors[key] = t.contiguous()
    sidecar: dict[str, torch.Tensor] = {}
    for name, r in results.items():
        if f"{name}.weight" in tensors:
            raise QuantkitError(f"{name} is quantized but its FP weight is also present; this is a bug")
        encoded, side = format_.encode(name, r, fp_dtype)
        tensors.update(encoded)
        sidecar.update(side)
    config, qc, manifest = _config_and_manifest(ckpt.config, format_, plan, ckpt.fp_tensors, fp_dtype)
    with atomic_dir(out_dir, overwrite) as tmp:
        _save_sharded(tensors, tmp, limit)
        if sidecar:
            save_file(sidecar, str(tmp / format_.sidecar), metadata={"format": "pt"})
        _write_metadata(tmp, format_, config, qc, manifest, report, source)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
        if processor is not None:
            processor.save_pretrained(str(tmp))
        elif source is not None:
            _copy_source_files(source, tmp)
    return Path(out_dir)


def write_checkpoint_streamed(
    config: dict,
    parts: Iterable[tuple[dict[str, torch.Tensor], dict[str, QuantResult]]],
    out_dir: str | os.PathLike,
    *,
    fmt: str,
    extra: dict | None = None,
    source: str | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """write_checkpoint for a model that does not fit in memory: `parts` yields (FP tensors, results)
    a piece at a time (the non-layer tensors, then one decoder layer per piece).

    Each piece is encoded once and spooled to disk, then dropped; the shards are assembled from the
    spool a tensor at a time. The files are byte-identical to write_checkpoint's for the same
    tensors (same shard split, names, index and safetensors layout), and memory stays at about one
    piece whatever the number of pieces.
    """
    format_ = format_for(fmt).with_act_bits(_act_bits(report, {}))
    limit = parse_size(max_shard_size)
    extra = extra or {}
    with atomic_dir(out_dir, overwrite) as tmp:
        spool, qspool = _Spool(tmp / ".spool" / "model"), _Spool(tmp / ".spool" / "qparams")
        stubs: dict[str, QuantResult] = {}  # metadata only: bits, group size, sym, act order, g_idx
        fp_names: list[str] = []
        fp_dtype: torch.dtype | None = None
        for fp, results in parts:
            if fp_dtype is None and any(t.is_floating_point() for t in fp.values()):
                fp_dtype = _float_dtype(fp)
            dtype = fp_dtype or torch.float32
            tensors = dict(fp)
            fp_names.extend(fp)
            sidecar: dict[str, torch.Tensor] = {}
            for name, r in results.items():
                check_result(name, r)
                format_.check(name, r)
                encoded, side = format_.encode(name, r, dtype)
                tensors.update(encoded)
                sidecar.update(side)
                empty = torch.empty(0, 0)
                stubs[name] = QuantResult(qweight=empty, scales=empty, zeros=empty, g_idx=r.g_idx.clone(), bits=r.bits,
                                          group_size=r.group_size, sym=r.sym, act_order=r.act_order)
            spool.add(tensors)
            qspool.add(sidecar)
            del tensors, sidecar, fp, results
        fp_dtype = fp_dtype or torch.float32
        fp_set = set(fp_names)
        for name in stubs:
            if f"{name}.weight" in fp_set:
                raise QuantkitError(f"{name} is quantized but its FP weight is also present; this is a bug")
        damp, static_groups = _solver_settings(report, {})
        plan = build_plan(stubs, fp_linears=extra.get("fp_linears") or [], damp=damp, static_groups=static_groups,
                          linear_order=extra.get("linear_order"), n_blocks=extra.get("n_blocks"),
                          act_bits=format_.act_bits)
        format_.check_plan(plan)
        config, qc, manifest = _config_and_manifest(config, format_, plan, fp_names, fp_dtype)
        _save_sharded_from_spool(spool, tmp, limit)
        if qspool.entries:
            qspool.write_file(list(qspool.entries), tmp / format_.sidecar)
        shutil.rmtree(tmp / ".spool")
        _write_metadata(tmp, format_, config, qc, manifest, report, source)
        if source is not None:
            _copy_source_files(source, tmp)
    return Path(out_dir)


@dataclass
class _SpoolEntry:
    path: Path
    begin: int  # byte range of the tensor's data in `path`
    end: int
    dtype: torch.dtype
    shape: list[int]


class _Spool:
    """Tensors saved once to numbered safetensors files, later copied a tensor at a time into the
    final files (so no more than one piece of the model is ever in memory)."""

    _CHUNK = 16 * 2**20

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.entries: dict[str, _SpoolEntry] = {}
        self._files = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Spool `tensors` (one file); the caller can drop them afterwards."""
        if not tensors:
            return
        for key in tensors:
            if key in self.entries:
                raise QuantkitError(f"tensor {key} is written twice; this is a bug")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self._files:06d}.safetensors"
        self._files += 1
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        base = 8 + size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            self.entries[key] = _SpoolEntry(path, base + begin, base + end, tensors[key].dtype, list(info["shape"]))

    def nbytes(self, key: str) -> int:
        entry = self.entries[key]
        return entry.end - entry.begin

    def write_file(self, keys: list[str], path: Path, metadata: dict[str, str] | None = None) -> None:
        """One safetensors file holding `keys`, laid out exactly as safetensors' save_file lays it out."""
        metadata = {"format": "pt"} if metadata is None else metadata
        # safetensors orders the data by dtype, then by name: ask it for that order on empty tensors.
        probe = save({k: torch.empty(0, dtype=self.entries[k].dtype) for k in keys}, metadata=metadata)
        probe_header = json.loads(probe[8 : 8 + struct.unpack("<Q", probe[:8])[0]])
        header: dict = {"__metadata__": metadata} if metadata else {}
        order = [k for k in probe_header if k != "__metadata__"]
        offset = 0
        for key in order:
            n = self.nbytes(key)
            header[key] = {"dtype": probe_header[key]["dtype"], "shape": self.entries[key].shape,
                           "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((8 - len(blob) % 8) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for key in order:
                entry = self.entries[key]
                with open(entry.path, "rb") as src:
                    src.seek(entry.begin)
                    left = entry.end - entry.begin
                    while left > 0:
                        chunk = src.read(min(left, self._CHUNK))
                        if not chunk:
                            raise QuantkitError(f"spool file {entry.path} is truncated; the disk may be full")
                        out.write(chunk)
                        left -= len(chunk)


def _save_sharded_from_spool(spool: _Spool, out: Path, limit: int) -> None:
    """_save_sharded for spooled tensors: the same shard split, file names and index."""
    keys = sorted(spool.entries, key=_natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = spool.nbytes(k)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        spool.write_file(shards[0], out / SINGLE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        spool.write_file(shard, out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(spool.nbytes(k) for k in keys)}, "weight_map": weight_map}
    _write_json(out / INDEX, index)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB', '100KB' (transformers' units)."""
    if isinstance(size, int):
        if size <= 0:
            raise QuantkitError(f"max shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise QuantkitError(f"cannot read shard size {size!r}; write it like 5GB, 500MB or 2000000")
    value, unit = float(m.group(1)), m.group(2).upper()
    base = {"": 1, "B": 1}
    for i, p in enumerate("KMGT", start=1):
        base[p] = base[p + "B"] = 10 ** (3 * i)
        base[p + "I"] = base[p + "IB"] = 2 ** (10 * i)
    if unit not in base or value <= 0:
        raise QuantkitError(f"cannot read shard size {size!r}; write it like 5GB, 500MB or 2000000")
    return int(value * base[unit])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _natural_key(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, limit: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index when over limit."""
    keys = sorted(tensors, key=_natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = _nbytes(tensors[k])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: tensors[k] for k in shards[0]}, str(out / SINGLE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    _write_json(out / INDEX, index)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


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
        if tuple(state[key].shape) != tuple(r.qweight.shape):
            raise QuantkitError(
                f"{name}: result shape {tuple(r.qweight.shape)} does not match the weight {tuple(state[key].shape)}"
            )
        if key not in out:
            raise QuantkitError(f"{name}: its weight is tied to another tensor; tied weights cannot be quantized")
        del out[key]
    return out


def _fp_linears(model: torch.nn.Module, results: dict[str, QuantResult]) -> list[str]:
    """Names of the nn.Linear modules kept in full precision (lm_head, vision tower, skipped ones)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in results)


def _layout(model: torch.nn.Module) -> tuple[list[str] | None, int | None]:
    try:
        from quantkit.models import adapter_for

        adapter = adapter_for(model)
        return adapter.linear_names(), len(adapter.decoder_layers(model))
    except Exception:  # noqa: BLE001 - layout hints are optional
        return None, None


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ---------------------------------------------------------------- reading


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
    root = Path(path)
    if not root.is_dir():
        raise QuantkitError(f"{root} is not a directory; give a quantkit output directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise QuantkitError(f"{root} is not a quantkit output (no {MANIFEST}); export it with quantkit first")
    manifest = _read_json(mpath)
    config = _read_json(root / "config.json")
    declared = config.pop("quantization_config", None)
    name = manifest.get("format")
    try:
        fmt = format_for(name)
    except QuantkitError:
        raise QuantkitError(f"{mpath} names unknown format {name!r}") from None
    settings = manifest_settings(manifest, mpath)
    fmt.check_declared(declared, settings, str(root))
    tensors = _load_tensors(root)
    sidecar = _read_safetensors(root / fmt.sidecar) if fmt.sidecar else {}
    stored = StoredTensors(root, tensors, sidecar)
    results: dict[str, QuantResult] = {}
    for module, setting in settings.items():
        try:
            r = fmt.decode(module, stored, setting)
            check_result(module, r)
        except QuantkitError as err:
            raise QuantkitError(f"{root}: {module}'s stored tensors do not fit the {setting.bits}-bit g{setting.group_size} "
                                f"setting quantkit.json gives it ({err}); the export is inconsistent, export it again") from None
        results[module] = r
    return Checkpoint(config=config, manifest=manifest, fp_tensors=stored.tensors, results=results, path=root)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise QuantkitError(f"{path} is missing; the checkpoint is incomplete") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuantkitError(f"{path} is not valid JSON ({err}); re-export the checkpoint") from err


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
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise QuantkitError(f"{index} has no weight_map; re-export the checkpoint")
        tensors: dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(root / fname))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise QuantkitError(f"{index} lists {missing[0]} but no shard holds it; the checkpoint is incomplete")
        return tensors
    return _read_safetensors(root / SINGLE)


# ---------------------------------------------------------------- loading a model


def dense_state(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """FP tensors plus each quantized linear's dequantized weight (in `dtype`, default the FP dtype)."""
    dtype = dtype or _float_dtype(ckpt.fp_tensors)
    state = dict(ckpt.fp_tensors)
    for name, r in ckpt.results.items():
        state[f"{name}.weight"] = r.dequantize().to(dtype)
    return state


def load_quantized(path: str | os.PathLike) -> torch.nn.Module:
    """Load any quantkit output as a transformers model holding the dequantized float weights (another
    quantized checkpoint goes through transformers' own loader, with what it needs named if missing)."""
    import transformers
    from transformers.initialization import no_init_weights

    root = Path(path)
    foreign = root.is_dir() and not (root / MANIFEST).is_file() and (root / "config.json").is_file()
    if foreign and "quantization_config" in _read_json(root / "config.json"):
        from quantkit.models import load_model

        return load_model(str(root))
    ckpt = read_checkpoint(path)
    config_cls = transformers.AutoConfig.for_model
    cfg = dict(ckpt.config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise QuantkitError(f"{Path(path) / 'config.json'} has no model_type")
    try:
        config = config_cls(model_type, **cfg)
    except Exception as err:  # noqa: BLE001
        raise QuantkitError(f"cannot build a {model_type!r} config from {path}: {err}") from err
    arch = (cfg.get("architectures") or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    dtype = _float_dtype(ckpt.fp_tensors)
    with no_init_weights():
        if model_cls is not None:
            model = model_cls._from_config(config, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dense_state(ckpt, dtype)
    # experts are stored per expert: load them into per-expert linears, then join them into transformers' fused ones
    unfused = unfuse_experts(model)
    if unfused:
        rename = model_key(model)
        state = {rename(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise QuantkitError(f"{path}: tensor {unexpected[0]} does not belong to a {arch or model_type} model")
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    really_missing = [k for k in missing if k in params and params[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise QuantkitError(f"{path}: tensor {really_missing[0]} is missing; the checkpoint is incomplete")
    if unfused:
        fuse_experts(model)
    act_bits = (ckpt.manifest.get("spec") or {}).get("act_bits")
    if act_bits is not None:  # a W8A8/W4A8 export runs with its linears' inputs quantized, as it was calibrated
        from quantkit.engine.activations import quantize_model_activations

        quantize_model_activations(model, sorted(ckpt.results), int(act_bits))
    model.eval()
    return model
