"""Writing and reading quantkit checkpoints in every export format.

A checkpoint directory holds config.json, safetensors weights (one file or shards with
model.safetensors.index.json), quantkit.json (format, spec, module lists) and, by format:
quantize_config.json (gptq/gptq_v2) or quantkit_qparams.safetensors (fake: the scales, zeros
and g_idx that turn the stored dequantized weights back into exact codes).
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
from quantkit.export import ct, gptq
from quantkit.export.card import CARD, model_card
from quantkit.export.common import FORMATS, VERSION, check_format, check_result, common_spec
from quantkit.fsutil import atomic_dir
from quantkit.quant.spec import QuantResult

logger = logging.getLogger(__name__)

MANIFEST = "quantkit.json"
REPORT = "quantkit_report.json"
QPARAMS = "quantkit_qparams.safetensors"
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
    tokenizer or processor) is saved beside it with save_pretrained, else `source`'s files are copied."""
    check_format(fmt)
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
    ckpt = Checkpoint(config=config, manifest={}, fp_tensors=fp, results=results)
    ckpt.extra = {"linear_order": linear_order, "n_blocks": n_blocks, "fp_linears": _fp_linears(model, results)}
    return write_checkpoint(
        ckpt, out_dir, fmt=fmt, source=source, report=report, overwrite=overwrite,
        max_shard_size=limit, extra_files=extra_files, processor=processor,
    )


def _config_and_manifest(
    source_config: dict, fmt: str, spec: dict, results: dict[str, QuantResult], fp_linears: list[str],
    fp_names, fp_dtype: torch.dtype, damp: float, static_groups: bool, linear_order, n_blocks,
) -> tuple[dict, dict | None, dict]:
    """config.json with the format's quantization_config, that config alone, and quantkit.json."""
    config = dict(source_config)
    config.pop("quantization_config", None)
    qc: dict | None = None
    if fmt in ("gptq", "gptq_v2"):
        qc = gptq.quantization_config(
            spec, results, 1 if fmt == "gptq" else 2, damp=damp, static_groups=static_groups,
            linear_order=linear_order, n_blocks=n_blocks,
        )
    elif fmt == "compressed-tensors":
        qc = ct.quantization_config(spec, fp_linears)
    if qc is not None:
        config["quantization_config"] = qc
    manifest = {
        "quantkit_version": VERSION,
        "format": fmt,
        "spec": spec,
        "quantized_modules": sorted(results),
        "fp_modules": sorted({k.rsplit(".", 1)[0] for k in fp_names}),
        "fp_linears": sorted(fp_linears),
        "linear_order": linear_order,
        "n_blocks": n_blocks,
        "dtype": str(fp_dtype).replace("torch.", ""),
    }
    return config, qc, manifest


def _write_metadata(out: Path, fmt: str, config: dict, qc: dict | None, manifest: dict, report: dict | None,
                    source: str | None = None) -> None:
    """config.json, quantize_config.json (GPTQ formats), quantkit.json, the report and the model card."""
    _write_json(out / "config.json", config)
    if qc is not None and fmt in ("gptq", "gptq_v2"):
        _write_json(out / "quantize_config.json", qc)
    _write_json(out / MANIFEST, manifest)
    if report is not None:
        _write_json(out / REPORT, report)
    (out / CARD).write_text(model_card(manifest, report, source), encoding="utf-8")


def encode_result(name: str, r: QuantResult, fmt: str, dtype: torch.dtype, qparams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors one quantized linear is stored as in `fmt` (keys prefixed with `name`).

    For "fake", the exact codes go to `qparams` (the quantkit_qparams sidecar) and the weight is
    stored in `dtype` only where that is exact.
    """
    if fmt in ("gptq", "gptq_v2"):
        enc = gptq.encode(r, 1 if fmt == "gptq" else 2)
    elif fmt == "compressed-tensors":
        enc = ct.encode(r, dtype if dtype in (torch.float16, torch.float32) else torch.float16)
    else:
        w = r.dequantize()
        stored = w.to(dtype)
        enc = {"weight": stored if torch.equal(stored.float(), w) else w}
        qparams[f"{name}.scales"] = r.scales.to(torch.float16).contiguous()
        qparams[f"{name}.zeros"] = r.zeros.contiguous()
        qparams[f"{name}.g_idx"] = r.g_idx.contiguous()
    return {f"{name}.{k}": v for k, v in enc.items()}


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
    check_format(fmt)
    limit = parse_size(max_shard_size)
    results = ckpt.results
    for name, r in results.items():
        check_result(name, r)
    spec = common_spec(results)
    prev_spec = ckpt.manifest.get("spec", {}) if ckpt.manifest else {}
    report_spec = (report or {}).get("spec", {}) if isinstance((report or {}).get("spec"), dict) else {}
    damp = float(report_spec.get("damp", prev_spec.get("damp", 0.01)))
    static_groups = bool(report_spec.get("static_groups", prev_spec.get("static_groups", False)))
    spec = {**spec, "damp": damp, "static_groups": static_groups}
    fp_dtype = _float_dtype(ckpt.fp_tensors)
    extra = ckpt.extra or {}
    fp_linears = extra.get("fp_linears") or ckpt.manifest.get("fp_linears", [])

    # Validate everything before touching the output path.
    if fmt == "gptq":
        for name, r in results.items():
            gptq.check_v1(name, r)
    if fmt == "compressed-tensors":
        for name, r in results.items():
            ct.check_supported(name, r)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in ckpt.fp_tensors.items():
        tensors[key] = t.contiguous()
    qparams: dict[str, torch.Tensor] = {}
    for name, r in results.items():
        if f"{name}.weight" in tensors:
            raise QuantkitError(f"{name} is quantized but its FP weight is also present; this is a bug")
        tensors.update(encode_result(name, r, fmt, fp_dtype, qparams))
    config, qc, manifest = _config_and_manifest(
        ckpt.config, fmt, spec, results, fp_linears, ckpt.fp_tensors, fp_dtype, damp, static_groups,
        extra.get("linear_order") or ckpt.manifest.get("linear_order"),
        extra.get("n_blocks") or ckpt.manifest.get("n_blocks"),
    )
    with atomic_dir(out_dir, overwrite) as tmp:
        _save_sharded(tensors, tmp, limit)
        if qparams:
            save_file(qparams, str(tmp / QPARAMS), metadata={"format": "pt"})
        _write_metadata(tmp, fmt, config, qc, manifest, report, source)
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
    check_format(fmt)
    limit = parse_size(max_shard_size)
    extra = extra or {}
    fp_linears = extra.get("fp_linears") or []
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
            qparams: dict[str, torch.Tensor] = {}
            for name, r in results.items():
                check_result(name, r)
                if fmt == "gptq":
                    gptq.check_v1(name, r)
                elif fmt == "compressed-tensors":
                    ct.check_supported(name, r)
                tensors.update(encode_result(name, r, fmt, dtype, qparams))
                empty = torch.empty(0, 0)
                stubs[name] = QuantResult(qweight=empty, scales=empty, zeros=empty, g_idx=r.g_idx.clone(), bits=r.bits,
                                          group_size=r.group_size, sym=r.sym, act_order=r.act_order)
            spool.add(tensors)
            qspool.add(qparams)
            del tensors, qparams, fp, results
        fp_dtype = fp_dtype or torch.float32
        fp_set = set(fp_names)
        for name in stubs:
            if f"{name}.weight" in fp_set:
                raise QuantkitError(f"{name} is quantized but its FP weight is also present; this is a bug")
        spec = common_spec(stubs)
        report_spec = (report or {}).get("spec", {}) if isinstance((report or {}).get("spec"), dict) else {}
        damp = float(report_spec.get("damp", 0.01))
        static_groups = bool(report_spec.get("static_groups", False))
        spec = {**spec, "damp": damp, "static_groups": static_groups}
        config, qc, manifest = _config_and_manifest(
            config, fmt, spec, stubs, fp_linears, fp_names, fp_dtype, damp, static_groups,
            extra.get("linear_order"), extra.get("n_blocks"),
        )
        _save_sharded_from_spool(spool, tmp, limit)
        if qspool.entries:
            qspool.write_file(list(qspool.entries), tmp / QPARAMS)
        shutil.rmtree(tmp / ".spool")
        _write_metadata(tmp, fmt, config, qc, manifest, report, source)
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
    src = Path(source).expanduser()
    if src.is_dir():
        for fname in SOURCE_FILES:
            if (src / fname).is_file():
                shutil.copy2(src / fname, out / fname)
        return
    try:  # a hub id: only what the local cache already holds (no network needed)
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(source, allow_patterns=list(SOURCE_FILES), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - tokenizer files are a convenience
        logger.warning("could not copy tokenizer/processor files from %r: %s", source, err)
        return
    for fname in SOURCE_FILES:
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
    config.pop("quantization_config", None)
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise QuantkitError(f"{mpath} names unknown format {fmt!r}")
    spec = manifest.get("spec") or {}
    try:
        bits, group_size, sym = int(spec["bits"]), int(spec["group_size"]), bool(spec["sym"])
        act_order = bool(spec.get("act_order", False))
        names = list(manifest["quantized_modules"])
    except (KeyError, TypeError, ValueError) as err:
        raise QuantkitError(f"{mpath} lacks a valid spec or module list ({err})") from err
    tensors = _load_tensors(root)
    qparams = _read_safetensors(root / QPARAMS) if fmt == "fake" else {}
    results: dict[str, QuantResult] = {}
    for name in names:
        if fmt in ("gptq", "gptq_v2"):
            t = _take(tensors, name, gptq.TENSORS, root)
            r = gptq.decode(t, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                            version=1 if fmt == "gptq" else 2)
        elif fmt == "compressed-tensors":
            wanted = ("weight_packed", "weight_scale", "weight_shape") + (() if sym else ("weight_zero_point",))
            t = _take(tensors, name, wanted, root)
            r = ct.decode(t, bits=bits, group_size=group_size, sym=sym, act_order=act_order)
        else:
            r = _decode_fake(root, tensors, qparams, name, bits, group_size, sym, act_order)
        check_result(name, r)
        results[name] = r
    return Checkpoint(config=config, manifest=manifest, fp_tensors=tensors, results=results, path=root)


def _decode_fake(root: Path, tensors: dict, qp: dict, name: str, bits: int, group_size: int, sym: bool,
                 act_order: bool) -> QuantResult:
    qp_path = root / QPARAMS
    w = _take(tensors, name, ("weight",), root)["weight"].float()
    p = {k: qp.get(f"{name}.{k}") for k in ("scales", "zeros", "g_idx")}
    if any(v is None for v in p.values()):
        raise QuantkitError(f"{qp_path} lacks the scales/zeros/g_idx of {name}; the checkpoint is incomplete")
    g = p["g_idx"].long()
    scales = p["scales"].float()
    zeros = p["zeros"]
    codes = torch.round(w / scales[:, g]) + zeros[:, g].float()
    maxq = (1 << bits) - 1
    if bool(((codes < 0) | (codes > maxq)).any()):
        raise QuantkitError(f"{name}: stored weights do not fit the {bits}-bit grid of {qp_path.name}")
    r = QuantResult(qweight=codes.to(torch.uint8), scales=scales, zeros=zeros, g_idx=p["g_idx"],
                    bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    if not torch.equal(r.dequantize(), w):
        raise QuantkitError(f"{name}: stored weights are not exactly on the grid of {qp_path.name}")
    return r


def _take(tensors: dict, name: str, suffixes: tuple[str, ...], root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for s in suffixes:
        key = f"{name}.{s}"
        if key not in tensors:
            raise QuantkitError(f"{root}: tensor {key} is missing; the checkpoint is incomplete")
        out[s] = tensors.pop(key)
    return out


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
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise QuantkitError(f"{path}: tensor {unexpected[0]} does not belong to a {arch or model_type} model")
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    really_missing = [k for k in missing if k in params and params[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise QuantkitError(f"{path}: tensor {really_missing[0]} is missing; the checkpoint is incomplete")
    model.eval()
    return model
