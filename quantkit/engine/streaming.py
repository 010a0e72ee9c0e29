"""Low-memory calibration: a meta-device skeleton, decoder layers streamed from the safetensors
files one at a time, each finished layer written to a work area (and freed), and resume.

Work area (`work_dir`, beside the output as OUT.partial): state.json (settings and the number of
finished layers), layer_NNNNN.safetensors (that layer's quantized codes and its FP tensors) and
hidden.safetensors (the inputs of the next layer, per sample). A run killed at any point resumes
from the last finished layer and produces byte-identical tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from quantkit.engine.comm import Comm
from quantkit.engine.layerwise import (
    Calibration,
    TokenWeights,
    check_head,
    check_layer,
    first_layer_streams,
    layer_weights,
    peak_rss_mb,
    quantize_head,
    quantize_layer,
)
from quantkit.errors import QuantkitError
from quantkit.fsutil import atomic_file
from quantkit.models import adapter_for, get_module
from quantkit.models.base import Adapter
from quantkit.quant.spec import QuantResult, QuantSpec

STATE = "state.json"
HIDDEN = "hidden.safetensors"
_RESULT_PARTS = ("qweight", "scales", "zeros", "g_idx")


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

    def __init__(self, model_dir: str | os.PathLike) -> None:
        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {key: root / fname for key, fname in weight_map.items()}
        elif (root / "model.safetensors").is_file():
            path = root / "model.safetensors"
            self.where = dict.fromkeys(safetensors_keys(path), path)
        else:
            raise QuantkitError(f"--low-memory needs safetensors weights in {root} (model.safetensors or an index)")

        self.stored_name: dict[str, str] = {}  # model name -> name in the files, where they differ

    def use_model_names(self, model: nn.Module) -> None:
        """Re-key the tensors by the names `model` gives them, renamed as transformers' loader renames
        checkpoint keys (VLM checkpoints keep legacy layouts: language_model.model.layers...)."""
        names = checkpoint_names_to_model_names(model, list(self.where))
        self.stored_name = {new: old for old, new in names.items() if new != old}
        self.where = {names[key]: path for key, path in self.where.items()}

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read `keys` from their files (only those tensors are brought into memory, none stays mapped)."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(self.stored_name.get(key, key))
        model_name = {old: new for new, old in self.stored_name.items()}
        out = {}
        for path, names in by_file.items():
            out.update({model_name.get(k, k): v for k, v in read_safetensors(path, names).items()})
        return out


def checkpoint_names_to_model_names(model: nn.Module, keys: Sequence[str]) -> dict[str, str]:
    """Each checkpoint key -> the model's name for it, as transformers renames them on load."""
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
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    out = {}
    for key in keys:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise QuantkitError(
                f"--low-memory reads tensors as stored, and {key} needs transformers' conversion on load "
                "(fused or split weights); run without --low-memory"
            )
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


def build_skeleton(model_dir: str, dtype: str = "auto") -> tuple[nn.Module, Adapter, WeightSource]:
    """The model on the meta device, with every tensor outside the decoder layers loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config)
    source = WeightSource(model_dir)
    torch_dtype = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    auto_class = AutoModelForImageTextToText if adapter.vision else AutoModelForCausalLM
    with _parameters_on_meta():
        model = auto_class.from_config(config)
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
    if dtype != "auto":
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    layer = layers[index]
    layer.load_state_dict(tensors, strict=True, assign=True)
    for param in layer.parameters():
        param.requires_grad_(False)
    if _meta_tensors(layer):
        raise QuantkitError(f"--low-memory: layer {index} has tensors {_meta_tensors(layer)[:5]} not in the checkpoint")
    return layer


def release_layer(model: nn.Module, adapter: Adapter, index: int) -> None:
    """Put decoder layer `index` back on the meta device, freeing its memory."""
    layers = adapter.decoder_layers(model)
    layers[index] = layers[index].to("meta")
    _trim_heap()


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): no malloc_trim/mallopt to call
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps per layer)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> None:
    """Have glibc serve every allocation of `nbytes` or more with its own mapping, unmapped on free.

    By default glibc raises that threshold each time such a block is freed, up to 32 MiB, after
    which a layer's large tensors (Hessians, solver work arrays, weight copies: 1-32 MiB each) come
    from the heap, where they fragment it around small long-lived objects: each layer's peak then
    depends on the heap's history rather than on the layer (measured at width 1024: 812-940 MiB
    over 32 layers, against 756-759 MiB with a fixed threshold), and the run's peak is the worst
    of them. A fixed threshold disables that adjustment, so big blocks go back to the OS as soon as
    they are freed. Process-wide and permanent; each large allocation then costs an mmap and
    fresh zeroed pages (measured 10-20% more calibration time at width 1024, 1 thread).
    """
    try:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)
    except AttributeError:  # not glibc: its allocator has no such drift to undo
        pass


class DiskHidden:
    """A list of per-sample hidden states kept as files in a directory (--offload-dir)."""

    def __init__(self, directory: str | os.PathLike, items: Sequence[torch.Tensor]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = len(items)
        for i, item in enumerate(items):
            self[i] = item

    def _path(self, index: int) -> Path:
        return self.dir / f"hidden_{index:06d}.pt"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.load(self._path(index), weights_only=True)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        torch.save(value.contiguous(), self._path(index))


def _layer_file(work: Path, index: int) -> Path:
    return work / f"layer_{index:05d}.safetensors"


def _save_layer(work: Path, layer: nn.Module, index: int, adapter: Adapter, results: dict[str, QuantResult]) -> None:
    tensors = {}
    for name, r in results.items():
        for part in _RESULT_PARTS:
            tensors[f"q.{name}.{part}"] = getattr(r, part).contiguous()
    quantized = {f"{name}.weight" for name in results}
    prefix = adapter.layer_prefix(index)
    for key, value in layer.state_dict().items():
        if f"{prefix}.{key}" not in quantized:
            tensors[f"fp.{prefix}.{key}"] = value.detach().contiguous()
    with atomic_file(_layer_file(work, index)) as tmp:
        save_file(tensors, str(tmp))


def _load_layer_file(path: Path, spec: QuantSpec) -> tuple[dict[str, QuantResult], dict[str, torch.Tensor]]:
    tensors = read_safetensors(path)
    fp = {k[3:]: v for k, v in tensors.items() if k.startswith("fp.")}
    names = sorted({k[2:].rsplit(".", 1)[0] for k in tensors if k.startswith("q.")})
    results = {
        name: QuantResult(*(tensors[f"q.{name}.{part}"] for part in _RESULT_PARTS), bits=spec.bits,
                          group_size=spec.group_size, sym=spec.sym, act_order=spec.act_order)
        for name in names
    }
    return results, fp


def _save_hidden(work: Path, hidden: Sequence[torch.Tensor], fp_hidden: Sequence[torch.Tensor] | None) -> None:
    """Both streams in one file, so a resumed run never pairs one layer's quantized stream with another's FP one."""
    tensors = {f"h{i}": hidden[i].contiguous() for i in range(len(hidden))}
    if fp_hidden is not None:
        tensors.update({f"f{i}": fp_hidden[i].contiguous() for i in range(len(fp_hidden))})
    with atomic_file(work / HIDDEN) as tmp:
        save_file(tensors, str(tmp))


def _write_state(work: Path, state: dict) -> None:
    with atomic_file(work / STATE) as tmp:
        tmp.write_text(json.dumps(state, indent=1))


def read_state(work: str | os.PathLike) -> dict | None:
    """The work area's state (settings and finished layers), or None if there is none."""
    path = Path(work) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


@torch.no_grad()
def calibrate_streaming(
    model_dir: str,
    samples: Sequence[dict],
    spec: QuantSpec,
    work_dir: str | os.PathLike,
    method: str = "gptq",
    device: str = "cpu",
    token_weights: TokenWeights | None = None,
    progress: bool = True,
    resume: bool = False,
    fingerprint: dict | None = None,
    offload_dir: str | None = None,
    dtype: str = "auto",
    fp_target: bool | None = None,
    lm_head: bool = False,
    vision: bool = False,
) -> tuple[nn.Module, Calibration]:
    """Calibrate layer by layer with only one decoder layer in memory; return (skeleton, results).

    Finished layers go to `work_dir` as they complete; the returned Calibration's results are a
    StreamedResults that reads them back from there (a layer at a time, on access). With `resume`, a work area from an interrupted run with the same
    `fingerprint` (settings) is continued from its last finished layer. fp_target carries the FP
    stream beside the quantized one (see calibrate_model). lm_head quantizes the head last, from the
    final stream (quantize_head), and vision a VLM's vision side first (quantkit.engine.vision); their
    results stay in memory (they are recomputed on a resume).
    """
    from quantkit.quant import solver_for

    solver_for(method)
    spec.validate()
    if not samples:
        raise QuantkitError("no calibration samples; give --calib data with at least one sample")
    started = time.perf_counter()
    fix_mmap_threshold()
    model, adapter, source = build_skeleton(model_dir, dtype)
    n_layers = len(adapter.decoder_layers(model))
    for index in range(n_layers):  # cheap checks before any work: shapes only, weights are checked on load
        check_layer(adapter.decoder_layers(model)[index], index, adapter, spec)
    if lm_head:
        check_head(model, adapter, spec)
    work = Path(work_dir)
    state = {"fingerprint": fingerprint or {}, "layers_done": 0, "n_layers": n_layers, "layer_reports": []}
    previous = read_state(work)
    if previous is not None and resume:
        if previous["fingerprint"] != state["fingerprint"]:
            raise QuantkitError(f"cannot resume from {work}: it was made with other settings; drop --resume or remove it")
        state = previous
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _write_state(work, state)
    inputs, fp_inputs, vision_results, vision_report = first_layer_streams(
        model, adapter, samples, spec, method, device, fp_target, vision, Comm(), batch_size=1
    )
    start = state["layers_done"]
    if start > 0:
        saved = read_safetensors(work / HIDDEN)
        inputs.hidden = [saved[f"h{i}"].to(device) for i in range(len(inputs))]
        if fp_inputs is not None:
            fp_inputs.hidden = [saved[f"f{i}"].to(device) for i in range(len(inputs))]
        del saved
    if offload_dir is not None:
        inputs.hidden = DiskHidden(offload_dir, inputs.hidden)
        if fp_inputs is not None:
            fp_inputs.hidden = DiskHidden(Path(offload_dir) / "fp", fp_inputs.hidden)
    fp_dir = None if offload_dir is None else Path(offload_dir) / "fp_linear"
    comm = Comm()
    bar = tqdm(range(start, n_layers), desc=f"calibrate {method} w{spec.bits} (low memory)", disable=not progress)
    for index in bar:
        comm.enter_layer(index)
        layer_started = time.perf_counter()
        layer = load_layer(model, adapter, source, index, dtype)
        check_layer(layer, index, adapter, spec)
        layer = layer.to(device)
        weights, weight_report = layer_weights(token_weights, index, inputs, adapter, comm)
        results, reports = quantize_layer(layer, index, inputs, adapter, spec, method, device, weights, comm,
                                          fp_inputs=fp_inputs, fp_dir=fp_dir)
        for name, entry in weight_report.items():
            reports[name]["token_weights"] = entry
        _save_layer(work, layer.to("cpu"), index, adapter, results)
        _save_hidden(work, inputs.hidden, None if fp_inputs is None else fp_inputs.hidden)
        del results
        release_layer(model, adapter, index)
        state["layers_done"] = index + 1
        state["layer_reports"].append(
            {"layer": index, "seconds": round(time.perf_counter() - layer_started, 4), "linears": reports}
        )
        _write_state(work, state)
    head_results, head_report = {}, None
    if lm_head:
        weights, _ = layer_weights(token_weights, n_layers - 1, inputs, adapter, comm)
        head_results, head_report = quantize_head(model, adapter, inputs, spec, method, device, weights, comm, fp_inputs)
    all_results = StreamedResults(work, spec, n_layers, {**vision_results, **head_results})
    report = {
        "method": method,
        "fp_target": fp_inputs is not None,
        "lm_head": head_report,
        "vision": vision_report,
        "spec": spec.to_dict(),
        "nsamples": len(samples),
        "device": str(device),
        "low_memory": True,
        "resumed_from_layer": start if start else None,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "layers": state["layer_reports"],
    }
    return model, Calibration(results=all_results, report=report)


class StreamedResults(Mapping):
    """The QuantResults of a low-memory run, left in the work area's layer files: a mapping that
    reads a layer's results on access instead of holding every layer's in memory. `outside` holds
    results of linears outside the decoder layers (a quantized lm_head), in memory."""

    def __init__(self, work_dir: str | os.PathLike, spec: QuantSpec, n_layers: int,
                 outside: dict[str, QuantResult] | None = None) -> None:
        self.work = Path(work_dir)
        self.spec = spec
        self.n_layers = n_layers
        self.outside = dict(outside or {})
        self._layer_of: dict[str, int] = {}
        for index in range(n_layers):
            for key in safetensors_keys(_layer_file(self.work, index)):
                if key.startswith("q.") and key.endswith(".qweight"):
                    self._layer_of[key[2 : -len(".qweight")]] = index

    def layer(self, index: int) -> tuple[dict[str, QuantResult], dict[str, torch.Tensor]]:
        """Decoder layer `index`'s results and FP tensors, read from its file."""
        return _load_layer_file(_layer_file(self.work, index), self.spec)

    def __getitem__(self, name: str) -> QuantResult:
        if name in self.outside:
            return self.outside[name]
        return self.layer(self._layer_of[name])[0][name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._layer_of, *self.outside])

    def __len__(self) -> int:
        return len(self._layer_of) + len(self.outside)

    def __contains__(self, name: object) -> bool:
        return name in self._layer_of or name in self.outside


def export_streamed(
    model: nn.Module, work_dir: str | os.PathLike, results: Mapping[str, QuantResult], output: str, *,
    fmt: str, source: str | None, report: dict, overwrite: bool,
) -> Path:
    """Write the final checkpoint from the skeleton's non-layer tensors and the work area's layers.

    Layer by layer: each layer's file is read, encoded and spooled by write_checkpoint_streamed,
    then freed, so memory does not grow with the number of layers. `results` is the run's
    StreamedResults (or any mapping of every layer's results, e.g. held in memory).
    """
    from quantkit.export.checkpoint import write_checkpoint_streamed

    fix_mmap_threshold()  # for an export on its own; calibrate_streaming has set it already
    adapter = adapter_for(model)
    prefix = adapter.layers + "."
    fp: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if key.startswith(prefix):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied duplicate (lm_head to the embeddings)
        seen.add(ident)
        fp[key] = t.detach()
    n_layers = len(adapter.decoder_layers(model))
    work = Path(work_dir)
    streamed = isinstance(results, StreamedResults)

    outside = results.outside if streamed else {k: v for k, v in results.items() if not k.startswith(prefix)}
    for name in outside:
        fp.pop(f"{name}.weight", None)

    def parts() -> Iterator[tuple[dict[str, torch.Tensor], dict[str, QuantResult]]]:
        yield fp, outside
        for index in range(n_layers):
            if streamed:
                layer_results, layer_fp = results.layer(index)
            else:
                _, layer_fp = _load_layer_file(_layer_file(work, index), QuantSpec())
                layer_prefix = f"{adapter.layer_prefix(index)}."
                layer_results = {k: v for k, v in results.items() if k.startswith(layer_prefix)}
            yield layer_fp, layer_results
            del layer_results, layer_fp
            _trim_heap()

    fp_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in results)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    extra = {"linear_order": adapter.linear_names(), "n_blocks": n_layers, "fp_linears": fp_linears}
    return write_checkpoint_streamed(config, parts(), output, fmt=fmt, extra=extra, source=source, report=report,
                                     overwrite=overwrite)
