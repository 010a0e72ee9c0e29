"""Checks that run before any model forward: model files, devices, outputs, conflicting options, data.

Each failure is a QuantkitError (one line `error: ...` and exit code 2 at the CLI). The model check
reads safetensors headers only (names, shapes) and compares them with a meta-device model built
from config.json, so a tensor transformers would initialise randomly, a layer config.json invents
or a shape it gets wrong is refused before anything is loaded or calibrated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# any one of these lets AutoTokenizer build a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")


@dataclass
class ModelInfo:
    """What check_model learnt: the local directory (if any), the config and the weights' sizes."""

    name: str
    local: Path | None
    config: object
    weight_bytes: int = 0  # all safetensors files
    linear_numel: int = 0  # elements of the decoder linears that get quantized
    linear_bytes: int = 0
    weight_files: list[Path] = field(default_factory=list)  # the local safetensors files, when read

    def export_bytes(self, bits: int, fmt: str) -> int:
        """A rough size of the exported checkpoint (0 when the weights are not local)."""
        if not self.weight_bytes:
            return 0
        from quantkit.export.formats import format_for

        if format_for(fmt).stores_dense_weights:
            return self.weight_bytes
        # packed codes plus scales, zeros and g_idx (a few percent at any group size)
        quantized = int(self.linear_numel * bits / 8 * 1.15)
        return max(0, self.weight_bytes - self.linear_bytes) + quantized


# ---------------------------------------------------------------- what a run leaves behind

_KEPT: list[Callable[[], str | None]] = []


def note_kept(describe: Callable[[], str | None]) -> None:
    """Register a callable saying what a failed or interrupted run kept on purpose (for --resume)."""
    _KEPT.append(describe)


def kept_note() -> str | None:
    """What failed runs kept on purpose, or None when nothing was kept; clears the registry."""
    notes = [n for n in (describe() for describe in _KEPT) if n]
    _KEPT.clear()
    return "; ".join(notes) or None


def clear_kept() -> None:
    """Forget earlier runs' notes (one CLI invocation reports only its own)."""
    _KEPT.clear()


@contextlib.contextmanager
def resumable_work(work: str | os.PathLike) -> Iterator[None]:
    """A low-memory run's work area: kept on failure when it holds finished layers (for --resume), else removed."""
    from quantkit.fsutil import remove_created

    root = Path(work)
    created = [d for d in [root.parent, *root.parent.parents] if not d.exists()]
    try:
        yield
    except BaseException:
        done, total = _layers_done(root)
        if done:
            note_kept(lambda: f"{root} keeps {done} of {total} finished layers; rerun with --resume to continue")
        else:
            shutil.rmtree(root, ignore_errors=True)
            remove_created(created)
        raise


def _layers_done(work: Path) -> tuple[int, int]:
    try:
        state = json.loads((work / "state.json").read_text())
        return int(state.get("layers_done", 0)), int(state.get("n_layers", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, 0


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """Point tempfile (and child processes, via TMPDIR) at a fresh folder removed on every exit.

    Libraries leave files in the temp folder when a run fails (torch's pytorch-errorfile-*.pickle
    of a failed rank); inside this folder they go with it.
    """
    root = Path(tempfile.mkdtemp(prefix="quantkit-"))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(root)
    os.environ["TMPDIR"] = str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- options and devices


def check_device(device: str, devices: Iterable[int] | None = None, nproc: int = 1) -> None:
    """Refuse a device string torch cannot parse, CUDA where there is none, and GPU ids that do not exist."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise QuantkitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    ids = list(devices or [])
    if dev.type == "cpu":
        if ids:
            raise QuantkitError("--devices names GPUs but --device is cpu; pass --device cuda or drop --devices")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise QuantkitError(f"--device {device}: MPS is not available on this machine; use --device cpu")
        return
    if dev.type != "cuda":
        raise QuantkitError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible"
        raise QuantkitError(f"--device {device}: CUDA is not available ({build}); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None:
        ids.append(dev.index)
    elif not ids and nproc > count:
        raise QuantkitError(f"--nproc {nproc} needs {nproc} GPUs but this machine has {count}; lower --nproc")
    for index in ids:
        if not 0 <= index < count:
            raise QuantkitError(f"GPU {index} does not exist: this machine has {count} (ids 0..{count - 1})")


def check_format_bits(bits: int, fmt: str, act_order: bool, static_groups: bool) -> None:
    """Refuse a bit width or group layout the export format cannot store (before calibrating, not after)."""
    from quantkit.export.formats import format_for

    format_for(fmt).check_options(bits, act_order, static_groups)


def check_activation_options(spec: object, fmt: str, method: object) -> None:
    """Refuse activation-quantization or smoothing settings a run cannot honour (before any work)."""
    from quantkit.export.formats import format_for
    from quantkit.quant.smooth import smooth_uses_token_weights

    spec.validate()  # act-bits widths, per-channel symmetric weights, the smoothing mode
    if smooth_uses_token_weights(spec.smooth) and method.needs_activations and not method.token_weights:
        # the token weights a run is given weigh its solve too: TLQ-weighted smoothing goes with TLQ
        raise QuantkitError(f"--smooth tlq weighs tokens as TLQ does, and {method} solves unweighted; "
                            "pass --method tlq (or rtn), or --smooth uniform")
    if spec.act_bits is not None and not format_for(fmt).holds_activation_bits:
        raise QuantkitError(f"{fmt} checkpoints describe weight-only models and cannot hold --act-bits; "
                            "pass --format compressed-tensors (or fake)")


def max_positions(config: object) -> int | None:
    """The model's max_position_embeddings (a VLM's text model's), or None where it has none."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(config: object, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the positions the model was built for (its loss is meaningless there)."""
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise QuantkitError(f"{flag} {seqlen} exceeds the model's max_position_embeddings ({limit}); use {flag} {limit} or less")


def check_eval_options(seqlen: int, stride: int | None, batch_size: int, max_tokens: int | None) -> None:
    """eval's window options, before anything is loaded."""
    if seqlen < 2:
        raise QuantkitError(f"--seqlen must be at least 2, got {seqlen}")
    if stride is not None and not 1 <= stride <= seqlen:
        raise QuantkitError(f"--stride must be between 1 and --seqlen ({seqlen}), got {stride}")
    if batch_size < 1:
        raise QuantkitError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise QuantkitError(f"--max-tokens must be at least 2, got {max_tokens}")


# ---------------------------------------------------------------- data


def check_data(source: str | None, flag: str = "--calib") -> None:
    """Every local path of a data source exists and a recipe parses (the text is read later, once)."""
    if source is None:
        return
    from quantkit.data.recipes import is_recipe, load_recipe
    from quantkit.data.sources import _expand, _split_sources, check_text_source, record_kind

    if is_recipe(source):
        load_recipe(source)
        return
    try:
        for item in _split_sources(source):
            if not item.startswith("hf:"):
                _expand(item)
            elif not Path(item[3:].split(":")[0]).expanduser().exists():
                check_hub(item[3:].split(":")[0], "dataset")
    except QuantkitError as err:
        raise QuantkitError(f"{flag}: {err}") from None
    kind = record_kind(source) if len(_split_sources(source)) == 1 else None
    if kind == "chat":  # a file alone may hold chat or image-text records, read as such; in a text source, not
        from quantkit.data.chat import read_chat_records

        read_chat_records(source)
    elif kind == "image-text":
        from quantkit.data.images import read_image_records

        read_image_records(source)
    else:
        check_text_source(source)


def data_paths(source: str | None) -> list[str]:
    """The local paths named by a data source (to keep outputs away from them)."""
    if not source:
        return []
    items = [source] if Path(source).exists() else source.split(",")
    return [s.strip() for s in items if s.strip() and not s.startswith("hf:") and Path(s.strip()).exists()]


# ---------------------------------------------------------------- model files


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a path rather than a hub id (as quantkit.models.load_model decides)."""
    return (
        Path(name).exists()
        or name.startswith((".", "/", "~"))
        or (os.sep in name.rstrip(os.sep) and name.count("/") != 1)
    )


def _cached_snapshot(name: str) -> Path | None:
    """The local snapshot of a hub id when the cache holds one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: nothing local to check
        return None
    return path if (path / "config.json").is_file() else None


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_hub(name: str, kind: str = "model") -> None:
    """A hub id not in the local cache: one quick look-up, so an unreachable hub fails at once
    (the libraries retry for half a minute, a warning per try) and a typo'd path says "not found"."""
    if _offline():
        return  # the user asked for the cache only; the loader reports what it lacks
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        return
    api = HfApi()
    try:
        (api.model_info if kind == "model" else api.dataset_info)(name, timeout=10)
    except GatedRepoError:
        return  # it exists; the loader says what access it needs
    except RepositoryNotFoundError:
        raise QuantkitError(f"{kind} {name} not found: no such local path and no {kind} of that name on the Hugging Face hub") from None
    except Exception as err:  # noqa: BLE001 - network errors come from httpx/requests/OSError alike
        raise QuantkitError(
            f"{kind} {name} not found locally, and the Hugging Face hub cannot be reached to fetch it ({_first_line(err)}); "
            "give a local path, or set HF_HUB_OFFLINE=1 to use what the cache holds"
        ) from None


def _first_line(err: BaseException) -> str:
    """The error's message on one line: libraries put the real reason on a second line often enough."""
    text = " ".join(str(err).split())
    if not text:
        return type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a safetensors file, from its header only."""
    from safetensors import safe_open

    if not path.is_file():
        raise QuantkitError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as handle:
            out = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                piece = handle.get_slice(key)
                out[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
            return out
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise QuantkitError(
            f"{path} is not a readable safetensors file ({_first_line(err)}); it is truncated or corrupt, save or download it again"
        ) from None


def read_headers(root: Path) -> tuple[dict[str, tuple[tuple[int, ...], str, Path]], list[Path]] | None:
    """Every stored tensor of a model directory (single file or sharded index), or None without safetensors."""
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise QuantkitError(f"{index} is not a valid safetensors index ({_first_line(err)})") from None
        files = [root / f for f in sorted(set(weight_map.values()))]
    elif (root / SINGLE).is_file():
        weight_map, files = None, [root / SINGLE]
    else:
        return None
    tensors: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for path in files:
        for key, (shape, dtype) in read_header(path).items():
            tensors[key] = (shape, dtype, path)
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in tensors:
                raise QuantkitError(f"{index} places {key} in {fname}, which does not hold it; the checkpoint is incomplete")
    return tensors, files


def build_meta_model(config: object, name: str) -> tuple[object, object]:
    """(model, adapter): the model config.json describes, on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from quantkit.models import adapter_for

    adapter = adapter_for(config)
    auto_class = AutoModelForImageTextToText if adapter.vision else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto_class.from_config(config), adapter
    except QuantkitError:
        raise
    except Exception as err:  # noqa: BLE001 - any config inconsistency surfaces here
        raise QuantkitError(f"config.json of {name} does not describe a buildable model: {_first_line(err)}") from None


def check_model(name: str, *, tokenizer: bool = True, processor: bool = False) -> ModelInfo:
    """Config, safetensors headers against the architecture, and the tokenizer (or processor) of a model."""
    from transformers import AutoConfig

    local: Path | None
    user_dir = looks_local(name)
    if user_dir:
        local = Path(name).expanduser()
        if not (local / "config.json").is_file():
            raise QuantkitError(f"model path {name} not found or has no config.json; give a model directory or a hub id")
    else:
        local = _cached_snapshot(name)
        if local is None:
            check_hub(name, "model")
    try:
        config = AutoConfig.from_pretrained(str(local) if local is not None else name)
    except Exception as err:  # noqa: BLE001 - a bad config.json raises ValueError, OSError, KeyError...
        raise QuantkitError(f"cannot read the config of {name}: {_first_line(err)}") from None
    info = ModelInfo(name=name, local=local, config=config)
    from quantkit.models import check_quantized_loadable

    check_quantized_loadable(config, name)
    # A quantized checkpoint stores packed tensors that transformers' quantizer maps, not the float weights.
    quantized = getattr(config, "quantization_config", None) is not None
    model, adapter = build_meta_model(config, name)
    if local is not None and not quantized and (user_dir or _weights_complete(local)):
        headers = read_headers(local)
        if headers is not None:
            stored, files = headers
            info.weight_files = list(files)
            info.weight_bytes = sum(p.stat().st_size for p in files)
            _check_tensors(name, model, adapter, stored)
            n_layers = len(adapter.decoder_layers(model))
            linears = {f"{adapter.layer_prefix(i)}.{lin}.weight" for i in range(n_layers) for lin in adapter.linear_names()}
            state = model.state_dict()
            for key in linears & set(state):
                numel = state[key].numel()
                info.linear_numel += numel
                info.linear_bytes += numel * _dtype_size(stored, key, state[key].element_size())
        elif user_dir and not any(local.glob("*.bin")):
            raise QuantkitError(f"{name} has no weights (no model.safetensors, index or .bin files)")
    if processor:
        check_processor(str(local) if local is not None else name)
    elif tokenizer:
        check_tokenizer(str(local) if local is not None else name, config)
    return info


def _weights_complete(root: Path) -> bool:
    """Whether a hub snapshot holds all its safetensors (the cache may hold only a config and a tokenizer)."""
    index = root / INDEX
    if index.is_file():
        try:
            return all((root / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    return (root / SINGLE).is_file()


def _dtype_size(stored: dict, key: str, default: int) -> int:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
    entry = stored.get(key)
    return sizes.get(entry[1], default) if entry else default


def _check_tensors(name: str, model, adapter, stored: dict[str, tuple[tuple[int, ...], str, Path]]) -> None:
    """Every parameter present with its configured shape, no layer or tensor the config does not describe."""
    from quantkit.models.checks import check_stored_dtypes
    from quantkit.models.streamed import checkpoint_names_to_model_names

    try:
        renamed = checkpoint_names_to_model_names(model, list(stored))
    except QuantkitError:
        # fused/split weights that transformers converts on load: names cannot be compared one to one
        check_stored_dtypes({k: v[1] for k, v in stored.items()}, [k for k in stored if k.endswith((".weight", ".bias"))], name)
        return
    found = {renamed[k]: v for k, v in stored.items()}
    check_stored_dtypes({k: v[1] for k, v in found.items()},
                        [k for k, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()], name)
    state = model.state_dict()
    layers = adapter.decoder_layers(model)
    pattern = re.compile(re.escape(adapter.layers) + r"\.(\d+)\.")
    held = {int(m.group(1)) for k in found if (m := pattern.match(k))}
    if held and max(held) + 1 != len(layers):
        raise QuantkitError(
            f"config.json of {name} names {len(layers)} decoder layers but the checkpoint holds {max(held) + 1}; "
            "fix num_hidden_layers or the weights"
        )
    ignore_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    groups: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(key)  # tied parameters share one object
    missing = [keys[0] for keys in groups.values()
               if not any(k in found for k in keys) and not any(p.search(k) for p in ignore_missing for k in keys)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QuantkitError(
            f"{name}: tensor {missing[0]}{more} is not in the checkpoint; transformers would initialise it randomly "
            "and quantkit would quantize noise. Save the model again or fix config.json"
        )
    for key, (shape, _, path) in found.items():
        if key in state and tuple(state[key].shape) != shape:
            raise QuantkitError(
                f"{name}: tensor {key} is {list(shape)} in {path.name} but config.json makes it {list(state[key].shape)}; "
                "config.json does not match the weights"
            )
    ignore_unexpected = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    for key, (_, _, path) in found.items():
        if key not in state and not key.endswith("inv_freq") and not any(p.search(key) for p in ignore_unexpected):
            raise QuantkitError(
                f"{name}: tensor {key} in {path.name} is not part of the model config.json describes; "
                "config.json does not match the weights"
            )


def check_tokenizer(name: str, config: object | None = None) -> None:
    """The tokenizer loads, and its ids fit the model's embedding."""
    from quantkit.eval.load import load_tokenizer

    local = Path(name)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise QuantkitError(
            f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); save the tokenizer beside the model"
        )
    try:
        tok = load_tokenizer(name)
    except QuantkitError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers fail in many ways on broken files
        raise QuantkitError(f"cannot load a tokenizer from {name}: {_first_line(err)}; save one beside the model") from None
    if config is not None:
        from quantkit.models.checks import check_vocabulary, embedding_rows

        check_vocabulary(len(tok), embedding_rows(config), f"the tokenizer of {name}")


def check_processor(name: str) -> None:
    """A VLM's processor (tokenizer and image processor) loads."""
    from quantkit.data.images import load_processor

    try:
        load_processor(name)
    except QuantkitError:
        raise
    except Exception as err:  # noqa: BLE001
        raise QuantkitError(f"cannot load the processor of {name}: {_first_line(err)}") from None


def check_export_dir(path: str | os.PathLike) -> None:
    """A quantkit output's safetensors headers are readable (its tensors are checked when read)."""
    root = Path(path)
    for file in sorted(root.glob("*.safetensors")):
        read_header(file)


def is_quantkit_output(path: str | os.PathLike) -> bool:
    """Whether a directory is a quantkit export (it has quantkit.json)."""
    return (Path(path).expanduser() / "quantkit.json").is_file()


# ---------------------------------------------------------------- outputs


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def check_writable(directory: Path, what: str) -> None:
    """A file can be created in `directory` (read-only mounts, permissions and full disks show up here)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=directory)
    except OSError as err:
        raise QuantkitError(f"cannot write {what} in {directory}: {err.strerror or err}; choose another location") from None
    os.close(fd)
    os.unlink(probe)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output(output: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike | None] = (),
                 need_bytes: int = 0, flag: str = "-o") -> Path:
    """The output directory: new (or --overwrite), not a file, away from every source and the working directory,
    its location writable with room for `need_bytes`."""
    from quantkit.fsutil import check_output_dir

    check_output_dir(output, overwrite)
    out = Path(os.path.abspath(output))
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output {output} is a file; {flag} takes a directory")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise QuantkitError(f"output {output} is the current directory or holds it; choose a new directory for {flag}")
    for source in sources:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if real == src:
            raise QuantkitError(f"output {output} is the input {source}; choose another {flag} (the input must stay intact)")
        if src in real.parents:
            raise QuantkitError(f"output {output} is inside the input {source}; choose a directory outside it")
        if real in src.parents:
            raise QuantkitError(f"output {output} holds the input {source}; replacing it would delete the input, choose another {flag}")
    where = _nearest_existing(out.parent)
    if not where.is_dir():
        raise QuantkitError(f"cannot create output {output}: {where} is a file")
    check_writable(where, f"output {output}")
    if need_bytes:
        free = shutil.disk_usage(where).free
        if free < need_bytes:
            raise QuantkitError(
                f"not enough space for output {output}: about {_size(need_bytes)} needed, {_size(free)} free in {where}; "
                "free some space or choose another location"
            )
    return out


def check_offload_dir(path: str | os.PathLike | None) -> None:
    """--offload-dir: a directory (created if missing) in a writable place."""
    if path is None:
        return
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise QuantkitError(f"--offload-dir {path} is a file; give a directory (it is created if missing)")
    where = _nearest_existing(root)
    if not where.is_dir():
        raise QuantkitError(f"cannot create --offload-dir {path}: {where} is a file")
    check_writable(where, f"--offload-dir {path}")


# ---------------------------------------------------------------- per command


def preflight_calibration(model_name: str | None, output: str | None, *, bits: int, fmt: str, act_order: bool,
                          static_groups: bool, overwrite: bool, calib: object, calib_set: str | None, seqlen: int,
                          device: str, devices: list[int] | None, nproc: int, offload_dir: str | None,
                          low_memory: bool, resume: bool, model: object | None = None,
                          tokenizer_given: bool = False, chat_template: str | os.PathLike | None = None,
                          part: str = "all", recipe: object | None = None, spec: object | None = None,
                          method: object | None = None, lm_head: bool = False, vision: bool = False) -> ModelInfo:
    """Everything `quantkit calibrate` (and quantkit.quantize) can check before it loads the model and draws
    samples. `model` is an already loaded model (model_name None), `calib` a source spec or in-memory data,
    `output` None when nothing is exported; a `recipe` (with the run's `spec` and `method`) is checked
    against the model's linears (check_recipe)."""
    from quantkit.data.calibration import is_image_jsonl, is_source
    from quantkit.data.recipes import is_recipe

    check_format_bits(bits, fmt, act_order, static_groups)
    check_device(device, devices, nproc)
    source = os.fspath(calib) if calib is not None and is_source(calib) else None
    check_data(source)
    if calib_set is not None:
        from quantkit.importance import read_manifest

        read_manifest(calib_set)
    check_offload_dir(offload_dir)
    image_data = source is not None and (is_recipe(source) or is_image_jsonl(source))
    if model is not None:
        from quantkit.models import adapter_for
        from quantkit.models.checks import check_model_weights

        adapter_for(model)  # an unsupported architecture fails here, as for a model read from files
        check_model_weights(model)
        info = ModelInfo(name=type(model).__name__, local=None, config=model.config)
    else:
        info = model_for_data(model_name, tokenizer=calib is not None and not tokenizer_given,
                              image_data=image_data and not tokenizer_given)
        if low_memory and info.weight_files:
            from quantkit.models.checks import check_weight_files

            check_weight_files(info.weight_files, model_name)  # streamed layers are never all in memory at once
    if calib is not None:
        check_seqlen(info.config, seqlen)
    if source is not None:
        from quantkit.data.calibration import check_source_for_model
        from quantkit.models import is_vlm

        check_source_for_model(source, is_vlm(info.config), model_name or info.name)
    check_chat_data(source, chat_template, part, None if model is not None or tokenizer_given else info)
    if recipe is not None:
        check_recipe(recipe, spec, method, fmt, model if model is not None else info.config,
                     model_name or info.name, lm_head=lm_head, vision=vision)
    if output is None:
        return info
    need = info.export_bytes(bits, fmt)
    if low_memory and need:
        # the spool and the final files coexist in the output's temporary directory, beside OUTPUT.partial's codes
        from quantkit.calibrate import work_dir_for

        need = 2 * need + (0 if resume and work_dir_for(output).is_dir() else info.linear_numel)
    sources = [model_name, calib_set, offload_dir, *data_paths(source)]
    check_output(output, overwrite=overwrite, sources=sources, need_bytes=need)
    return info


def check_recipe(recipe: object, spec: object, method: object, fmt: str, model_or_config: object, name: str, *,
                 lm_head: bool = False, vision: bool = False) -> None:
    """A recipe fits the model (every pattern matches a linear, every group size divides its linears' widths,
    its methods need no statistics the run does not gather) and the format stores every setting it gives."""
    from torch import nn

    from quantkit.engine.checks import candidate_linears, model_linears
    from quantkit.models import adapter_for

    if isinstance(model_or_config, nn.Module):
        model, adapter = model_or_config, adapter_for(model_or_config)
    else:
        model, adapter = build_meta_model(model_or_config, name)  # shapes only: no weights are read
    chosen = recipe.check(candidate_linears(model, adapter, lm_head=lm_head, vision=vision), spec, method,
                          model_linears(model))
    for settings in set(chosen.values()):
        try:
            check_format_bits(settings.spec.bits, fmt, settings.spec.act_order, settings.spec.static_groups)
        except QuantkitError as err:
            name = next(n for n, s in chosen.items() if s == settings)
            raise QuantkitError(f"recipe, for {name}: {err}") from None


def check_chat_data(source: str | None, chat_template: str | os.PathLike | None, part: str = "all",
                    info: ModelInfo | None = None) -> None:
    """Chat records can be rendered: --chat-template parses and applies to the data, or the model's tokenizer
    (info's, when the tokenizer is read from the model's files) has a chat template of its own."""
    from quantkit.data.calibration import check_chat_source
    from quantkit.data.chat import read_chat_template, template_for

    if chat_template is not None:
        read_chat_template(chat_template)
    if source is None:
        return
    if check_chat_source(source, chat_template, part) and chat_template is None and info is not None:
        from quantkit.eval.load import load_tokenizer

        target = str(info.local) if info.local is not None else info.name
        template_for(load_tokenizer(target), None, info.name)


def model_for_data(name: str, *, tokenizer: bool = True, image_data: bool = False) -> ModelInfo:
    """check_model with the processor where a VLM reads image-text data, else the tokenizer."""
    from quantkit.models import is_vlm

    info = check_model(name, tokenizer=False)
    target = str(info.local) if info.local is not None else name
    if image_data and is_vlm(info.config):
        check_processor(target)
    elif tokenizer:
        check_tokenizer(target, info.config)
    return info


def preflight_importance(model_name: str, calib: str, output: str, *, seqlen: int, device: str,
                         offload_dir: str | None, overwrite: bool, image_data: bool = False,
                         chat_template: str | os.PathLike | None = None, part: str = "all") -> ModelInfo:
    """Everything `quantkit importance` can check before it loads the model."""
    check_device(device)
    check_data(calib)
    check_offload_dir(offload_dir)
    info = model_for_data(model_name, tokenizer=True, image_data=image_data)
    check_seqlen(info.config, seqlen)
    from quantkit.data.calibration import check_source_for_model
    from quantkit.models import is_vlm

    check_source_for_model(calib, is_vlm(info.config), model_name)
    check_chat_data(calib, chat_template, part, info)
    check_output(output, overwrite=overwrite, sources=[model_name, offload_dir, *data_paths(calib)])
    return info


def preflight_eval(model_or_dir: str, *, seqlen: int | None, stride: int | None, batch_size: int,
                   max_tokens: int | None) -> None:
    """Everything `quantkit eval` can check before it loads the model (seqlen None: no text windows)."""
    if seqlen is not None:
        check_eval_options(seqlen, stride, batch_size, max_tokens)
    if is_quantkit_output(model_or_dir):
        from transformers import AutoConfig

        root = Path(model_or_dir).expanduser()
        check_export_dir(root)
        try:
            config = AutoConfig.from_pretrained(str(root))
        except Exception as err:  # noqa: BLE001
            raise QuantkitError(f"cannot read the config of {model_or_dir}: {_first_line(err)}") from None
        check_tokenizer(str(root), config)
    else:
        config = check_model(model_or_dir).config
    if seqlen is not None:
        check_seqlen(config, seqlen)


def export_size(in_dir: str | os.PathLike, fmt: str) -> int:
    """A rough size of `quantkit export IN_DIR --format fmt`: the input's, 4x where fake unpacks the codes."""
    root = Path(in_dir)
    size = sum(p.stat().st_size for p in root.glob("*.safetensors")) if root.is_dir() else 0
    try:
        source_fmt = json.loads((root / "quantkit.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        source_fmt = None
    from quantkit.export.formats import REGISTRY, format_for

    source = REGISTRY.get(source_fmt) if isinstance(source_fmt, str) else None
    unpacks = format_for(fmt).stores_dense_weights and not (source is not None and source.stores_dense_weights)
    return size * 4 if unpacks else size


def preflight_demo(model: str | None, data: str | None, out: str, *, overwrite: bool, seqlen: int) -> None:
    """`quantkit demo`'s checks before training or loading: your model and data, and the output."""
    if model is not None and data is not None:
        check_data(data, "--data")
        info = model_for_data(model)
        check_seqlen(info.config, seqlen)
    if model is None or data is not None:
        check_output(out, overwrite=overwrite, sources=[model, *data_paths(data)])
