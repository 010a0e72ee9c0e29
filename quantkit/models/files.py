"""A model's files, checked before anything is loaded, and kept for the loading: config.json, the safetensors
headers against the architecture config.json describes, the tokenizer, the hub when the name is a hub id.

check_model_files reads the safetensors headers only (names, shapes) and compares them with a meta-device
model built from config.json, so a tensor transformers would initialise randomly, a layer config.json invents
or a shape it gets wrong is refused before anything is loaded or calibrated. What it read (the config, the
stored tensors) comes back as ModelFiles, which load_model and build_skeleton reuse instead of reading again.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError, expect_utf8, first_line, one_line, refuse_special_in
from quantkit.models import looks_local
from quantkit.models.checks import stored_twice
from quantkit.readers import check_generation_config, read_json_object

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# any one of these lets AutoTokenizer build a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")
# name -> (shape, dtype, file) of every stored tensor
StoredTensors = dict[str, tuple[tuple[int, ...], str, Path]]


@dataclass
class ModelFiles:
    """What check_model_files learnt: the local directory (if any), the config, the stored tensors and the weights'
    sizes; load_model and build_skeleton reuse them instead of reading the files again."""

    name: str
    local: Path | None
    config: object
    stored: StoredTensors | None = field(default=None, repr=False)  # None: no safetensors read (hub, .bin, quantized)
    weight_bytes: int = 0  # all safetensors files
    linear_numel: int = 0  # elements of the decoder linears that get quantized
    linear_bytes: int = 0
    weight_files: list[Path] = field(default_factory=list)  # the local safetensors files, when read
    # the tokenizer (a VLM's processor for image data) the checks loaded, for the samples; not sent to other ranks
    tokenizer: object = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokenizer": None}

    @property
    def path(self) -> str:
        """Where the files are: the local directory, else the hub id."""
        return str(self.local) if self.local is not None else self.name


def cached_snapshot(name: str) -> Path | None:
    """The local snapshot of a hub id when the cache holds one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: nothing local to check
        return None
    return path if (path / "config.json").is_file() else None


def hub_offline() -> bool:
    """Whether the environment forbids the hub (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_hub(name: str, kind: str = "model") -> None:
    """A hub id not in the local cache: one quick look-up, so an unreachable hub fails at once
    (the libraries retry for half a minute, a warning per try) and a typo'd path says "not found"."""
    if hub_offline():
        return  # the user asked for the cache only; the loader reports what it lacks
    try:
        from huggingface_hub import HfApi, errors
    except ImportError:
        return
    api = HfApi()
    try:
        (api.model_info if kind == "model" else api.dataset_info)(name, timeout=10)
    except errors.GatedRepoError:
        return  # it exists; the loader says what access it needs
    except (errors.RepositoryNotFoundError, errors.HFValidationError):  # a name no hub id can be ("a b", a line break): not found
        raise QuantkitError(f"{kind} {one_line(name)} not found: no such local path and no {kind} of that name on the Hugging Face hub") from None
    except Exception as err:  # noqa: BLE001 - network errors come from httpx/requests/OSError alike
        raise QuantkitError(
            f"{kind} {one_line(name)} not found locally, and the Hugging Face hub cannot be reached to fetch it ({first_line(err)}); "
            "give a local path, or set HF_HUB_OFFLINE=1 to use what the cache holds"
        ) from None


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
            f"{path} is not a readable safetensors file ({first_line(err)}); it is truncated or corrupt, save or download it again"
        ) from None


def read_headers(root: Path) -> tuple[StoredTensors, list[Path]] | None:
    """Every stored tensor of a model directory (single file or sharded index), or None without safetensors."""
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise QuantkitError(f"{index} is not a valid safetensors index ({first_line(err)})") from None
        files = [root / f for f in sorted(set(weight_map.values()))]
    elif (root / SINGLE).is_file():
        weight_map, files = None, [root / SINGLE]
    else:
        return None
    tensors: StoredTensors = {}
    for path in files:
        for key, (shape, dtype) in read_header(path).items():
            if key in tensors:
                raise stored_twice(index, key, tensors[key][2].name, path.name, (weight_map or {}).get(key))
            tensors[key] = (shape, dtype, path)
    if weight_map is None:
        _check_no_second_copy(root, set(tensors))
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in tensors:
                raise QuantkitError(f"{index} places {key} in {fname}, which does not hold it; the checkpoint is incomplete")
    return tensors, files


def _check_no_second_copy(root: Path, names: set[str]) -> None:
    """Beside model.safetensors (holding `names`) and without an index, another safetensors file holding the same
    tensors (an old copy, a half-finished save) is refused: transformers reads model.safetensors alone, and which
    file the user meant is anybody's guess."""
    for other in sorted(root.glob("*.safetensors")):
        if other.name == SINGLE or other.name.startswith("quantkit_"):
            continue
        shared = sorted(names & set(read_header(other)))
        if shared:
            raise QuantkitError(f"{root} holds {other.name} beside {SINGLE}, with the same tensors ({shared[0]} and "
                                f"{len(shared) - 1} more) and no {INDEX}; transformers reads {SINGLE} alone: move "
                                f"{other.name} out of the model directory")


def build_meta_model(config: object, name: str) -> tuple[object, object]:
    """(model, adapter): the model config.json describes, on the meta device (shapes only, no memory)."""
    import torch

    from quantkit.models import adapter_for, auto_class_for

    auto_class = auto_class_for(config)
    try:
        with torch.device("meta"):
            model = auto_class.from_config(config)
    except QuantkitError:
        raise
    except Exception as err:  # noqa: BLE001 - any config inconsistency surfaces here
        raise QuantkitError(f"config.json of {name} does not describe a buildable model: {first_line(err)}") from None
    return model, adapter_for(model)  # an architecture quantkit cannot handle fails here, before any weight is read


def check_model_files(name: str, *, tokenizer: bool = True) -> ModelFiles:
    """Config, safetensors headers against the architecture, and (with `tokenizer`) the tokenizer of a model."""
    from transformers import AutoConfig

    local: Path | None
    if user_dir := looks_local(name):
        expect_utf8(name, "model path")
        local = Path(name).expanduser()
        refuse_special_in(local, f"model folder {name}")
        if not (local / "config.json").is_file():
            raise QuantkitError(f"model path {name} not found or has no config.json; give a model directory or a hub id")
    else:
        local = cached_snapshot(name)
        if local is None:
            check_hub(name, "model")
    try:
        config = AutoConfig.from_pretrained(str(local) if local is not None else name)
    except Exception as err:  # noqa: BLE001 - a bad config.json raises ValueError, OSError, KeyError...
        raise QuantkitError(f"cannot read the config of {one_line(name)}: {first_line(err)}") from None
    from quantkit.models.checks import check_bin_files, check_config_aliases, check_config_values

    check_config_values(config, name)
    if local is not None:  # the export copies generation_config.json as it is
        check_config_aliases(read_json_object(local / "config.json", "fix config.json"), config, name)
        check_generation_config(local)
    info = ModelFiles(name=name, local=local, config=config)
    from quantkit.models import check_quantized_loadable

    check_quantized_loadable(config, name)
    # A quantized checkpoint stores packed tensors that transformers' quantizer maps, not the float weights.
    quantized = getattr(config, "quantization_config", None) is not None
    model, adapter = build_meta_model(config, name)
    if local is not None and not quantized and (user_dir or _weights_complete(local)):
        headers = read_headers(local)
        if headers is not None:
            stored, files = headers
            info.stored = stored
            info.weight_files = list(files)
            info.weight_bytes = sum(p.stat().st_size for p in files)
            _check_tensors(name, model, adapter, stored)
            n_layers = len(adapter.decoder_layers(model))
            linears = {f"{adapter.layer_prefix(i)}.{lin}.weight" for i in range(n_layers) for lin in adapter.linear_names(i)}
            state = model.state_dict()
            for key in linears & set(state):
                numel = state[key].numel()
                info.linear_numel += numel
                info.linear_bytes += numel * _dtype_size(stored, key, state[key].element_size())
        else:  # no safetensors: the .bin files' dtypes, checked as the headers' are (or no weights at all)
            check_bin_files(local, name, required=user_dir)
    if tokenizer:
        check_tokenizer(info.path, config)
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


def _check_tensors(name: str, model, adapter, stored: StoredTensors) -> None:
    """Every parameter present with its configured shape and a float dtype, no layer or tensor the config does not
    describe."""
    from quantkit.models.checks import (
        check_stored_dtypes,
        config_shape_error,
        tied_pairs,
        untied_error,
    )
    from quantkit.models.streamed import checkpoint_names_to_model_names

    try:
        renamed = checkpoint_names_to_model_names(model, list(stored))
    except QuantkitError:
        # fused/split weights that transformers converts on load: names cannot be compared one to one
        check_stored_dtypes({k: v[1] for k, v in stored.items()}, [k for k in stored if k.endswith((".weight", ".bias"))], name)
        return
    found = _split_experts(model, {renamed[k]: v for k, v in stored.items()})
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
            raise config_shape_error(name, key, shape, state[key].shape, path.name, model.config,
                                     "config.json does not match the weights")
    stored_as = {v: k for k, v in renamed.items()}
    for target, tied_to in tied_pairs(model):
        if target in found and tied_to in found and not _stored_alike(found, stored_as, target, tied_to):
            raise untied_error(name, target, tied_to)
    ignore_unexpected = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    for key, (_, _, path) in found.items():
        if key not in state and not key.endswith("inv_freq") and not any(p.search(key) for p in ignore_unexpected):
            raise QuantkitError(
                f"{name}: tensor {key} in {path.name} is not part of the model config.json describes; "
                "config.json does not match the weights"
            )


def _stored_alike(found: StoredTensors, stored_as: dict[str, str], a: str, b: str) -> bool:
    """Whether two stored tensors (model names) hold the same values, compared a block of rows at a time."""
    from safetensors import safe_open

    from quantkit.models.checks import same_values

    (shape, _, path_a), (other, _, path_b) = found[a], found[b]
    if shape != other:
        return False
    with safe_open(str(path_a), framework="pt") as ha, safe_open(str(path_b), framework="pt") as hb:
        sa, sb = ha.get_slice(stored_as.get(a, a)), hb.get_slice(stored_as.get(b, b))
        if not shape:
            return same_values(sa[:], sb[:])
        width = max(1, math.prod(shape[1:]))
        step = max(1, (1 << 22) // width)
        return all(same_values(sa[r:r + step], sb[r:r + step]) for r in range(0, shape[0], step))


def _split_experts(model, found: dict) -> dict:
    """`found` (model name -> (shape, dtype, path)) with fused experts tensors of a checkpoint that keeps them fused
    (gpt-oss, Llama 4) given as the per-expert tensors of the model's split experts (quantkit.models.experts)."""
    import torch

    from quantkit.models.experts import unfused_state

    fused = {k: torch.empty(shape, device="meta") for k, (shape, _, _) in found.items()}
    split = unfused_state(model, fused)
    if split.keys() == fused.keys():
        return found
    out = {k: v for k, v in found.items() if k in split}
    popped = [k for k in fused if k not in split]
    for key in split.keys() - fused.keys():  # dtype and file of the fused tensor it came from (its container's)
        source = max(popped, key=lambda k: len(os.path.commonprefix([k, key])))
        out[key] = (tuple(split[key].shape), *found[source][1:])
    return out


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer from a model directory or hub id, with a QuantkitError when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise QuantkitError(f"cannot load a tokenizer from {path}: {first_line(err)}; save one beside the model") from err


def check_tokenizer(name: str, config: object | None = None):
    """The tokenizer loads, and its ids fit the model's embedding; returns it."""
    local = Path(name)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise QuantkitError(
            f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); save the tokenizer beside the model"
        )
    named = check_tokenizer_class(local) if local.is_dir() else None
    try:
        tok = load_tokenizer(name)
    except Exception as err:  # noqa: BLE001 - tokenizers fail in many ways on broken files
        if isinstance(err, QuantkitError) and named is None:
            raise
        as_class = f" as {named} (tokenizer_class in tokenizer_config.json)" if named else ""
        reason = first_line(err.__cause__ or err) if isinstance(err, QuantkitError) else first_line(err)
        raise QuantkitError(f"cannot load a tokenizer from {name}{as_class}: {reason}; save one beside the "
                            "model") from None
    from quantkit.models.checks import check_tokenizer_reads, check_vocabulary, embedding_rows

    if config is not None:
        check_vocabulary(tok, embedding_rows(config), f"the tokenizer of {name}")
        if local.is_dir():
            _check_added_tokens(local / "tokenizer.json", embedding_rows(config))
    check_tokenizer_reads(tok, f"the tokenizer of {name}")
    return tok


def _check_added_tokens(path: Path, rows: int | None) -> None:
    """tokenizer.json's added tokens have ids inside the embedding (transformers renumbers one past it to a free
    id, which the model never learnt for that token)."""
    if rows is None or not path.is_file():
        return
    try:
        added = json.loads(path.read_text()).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return  # loading the tokenizer has said what is wrong with the file
    for token in added:
        if isinstance(token, dict) and isinstance(token.get("id"), int) and token["id"] >= rows:
            raise QuantkitError(f"{path} adds token {str(token.get('content'))[:40]!r} with id {token['id']}, past the "
                                f"model's embedding of {rows} rows; the tokenizer belongs to another model or was "
                                "edited: give the model's own tokenizer")


def check_tokenizer_class(local: Path) -> str | None:
    """tokenizer_config.json's tokenizer_class names a class transformers has (returned; None when it names
    none): an unknown name (a typo, a class of a newer release) is replaced by the generic tokenizer without a
    word, and the export would rename it."""
    path = local / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = read_json_object(path, "fix it or save the tokenizer again")
    name = settings.get("tokenizer_class")
    if name is None or "auto_map" in settings:
        return None  # transformers picks by model type, or the model's own code names its class
    import transformers
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    def known(candidate: str) -> bool:
        try:
            return tokenizer_class_from_name(candidate) is not None
        except Exception:  # noqa: BLE001 - a name transformers cannot import counts as unknown
            return False

    if not isinstance(name, str) or not name:
        raise QuantkitError(f"{path}: tokenizer_class is {name!r}, not a class name; fix it or delete the field")
    if name in ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend"):
        return name
    if not any(known(c) for c in (name, name + "Fast", name.removesuffix("Fast"))):
        raise QuantkitError(
            f"{path}: tokenizer_class {name!r} is no tokenizer class of transformers {transformers.__version__}; "
            "correct the name (a newer transformers may have it), or delete the field to read tokenizer.json as "
            "it stands"
        )
    return name


def max_positions(config: object) -> int | None:
    """The model's max_position_embeddings (a VLM's text model's), or None where it has none."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(config: object, seqlen: int, flag: str = "--seqlen", recipe: str | None = None) -> None:
    """Refuse windows longer than the model's positions (its loss is meaningless there); recipe: whose own seqlen."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise QuantkitError(f"the model's config has max_position_embeddings {value}, which admits no {flag}; "
                                "fix config.json")
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        what, fix = ((f"recipe {recipe}'s seqlen", "or less, or lower the recipe's seqlen") if recipe is not None
                     else (flag, "or less"))  # no --seqlen given: the recipe's own applies
        raise QuantkitError(f"{what} {seqlen} exceeds the model's max_position_embeddings ({limit}); use {flag} {limit} {fix}")
