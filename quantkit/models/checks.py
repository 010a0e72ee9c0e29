"""What a model's weights and config must hold before anything is calibrated: float values, all of them finite,
tied tensors that are one tensor, and config values a model can run with.

A NaN in one embedding row or norm weight survives RTN and GPTQ untouched (they quantize the decoder
linears) and is exported as it came; integer weights are cast and quantized as if they were values. Both are
refused here by tensor name, from a loaded model or from the safetensors files, before any work. So are a
tie_word_embeddings config whose checkpoint stores a head of other values (transformers keeps them apart, other
loaders tie them), and config values no model runs with (a norm epsilon <= 0, a negative rope_theta).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors header names
_LAYER = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def where_in_model(name: str) -> str:
    """Where a tensor sits, for a message: "decoder layer 3", "the embeddings" or "outside the decoder layers"."""
    found = _LAYER.search(f".{name}")
    if found:
        return f"decoder layer {found.group(1)}"
    if "embed" in name or "wte" in name or "wpe" in name:
        return "the embeddings"
    return "outside the decoder layers"


def nonfinite_counts(tensor: torch.Tensor) -> str:
    """How many NaN and infinite values `tensor` holds ("2 NaN and 1 infinite", "" for none); float8 read as float32."""
    tensor = tensor.float() if tensor.element_size() == 1 else tensor  # float8: torch has no isfinite for it
    finite = torch.isfinite(tensor)
    nan = 0 if bool(finite.all()) else int(torch.isnan(tensor).sum())
    return " and ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (tensor.numel() - int(finite.sum()) - nan, "infinite")) if n)


def check_weight(name: str, tensor: torch.Tensor, source: str) -> None:
    """A float tensor with finite values only; else a QuantkitError naming `source`, the tensor and its layer."""
    if not tensor.is_floating_point():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise QuantkitError(f"{source}: weight {name} ({where_in_model(name)}) is {dtype}, not a float tensor; quantkit "
                            "quantizes float weights: save the model in float32, float16 or bfloat16")
    if counts := nonfinite_counts(tensor):
        # float16 overflows past 65504: finite bfloat16 or float32 weights loaded in float16 turn infinite
        cause = (" as loaded in float16 (at most 65504): where the checkpoint stores it in bfloat16 or float32, load it "
                 "so (--dtype bfloat16 or float32; dtype=), else the model is broken" if "NaN" not in counts and
                 tensor.dtype == torch.float16 else "; the model is broken and its quantized copy would be too: fix or "
                 "download the weights again")
        raise QuantkitError(f"{source}: weight {name} ({where_in_model(name)}) holds {counts} value(s) among its "
                            f"{tensor.numel()}{cause}")


# Set on a loaded model whose weights quantkit has rounded (quantize in place, load_quantized): what rounded them.
QUANTIZED_MARK = "quantkit_quantized"


def check_not_quantized(model: torch.nn.Module, source: str) -> None:
    """A model to quantize holds full-precision weights, not ones quantkit has already rounded: the file form (an
    export given as the model) is refused by its config (check_full_precision), the loaded form by its mark."""
    check_full_precision(getattr(model, "config", None), source)  # loaded through transformers' quantized loaders
    done = getattr(model, QUANTIZED_MARK, None)
    if done:
        raise QuantkitError(f"{source} holds weights quantkit already quantized ({done}); quantizing them again rounds "
                            "twice: quantize the full-precision model (load it again with from_pretrained)")


def check_layer_dtypes(model: torch.nn.Module, source: str) -> None:
    """A parameter has the dtype of the same parameter in every other decoder layer: a model cast in part (one
    layer in bfloat16, the rest in float32) cannot be fed layer by layer, and fails inside a layer's matmul."""
    seen: dict[str, tuple[str, torch.dtype]] = {}
    for name, param in model.named_parameters():
        if not param.is_floating_point() or not _LAYER.search(f".{name}"):
            continue
        first = seen.setdefault(_LAYER.sub(".N.", f".{name}", count=1), (name, param.dtype))
        if first[1] != param.dtype:
            kinds = (str(d).removeprefix("torch.") for d in (param.dtype, first[1]))
            raise QuantkitError(f"{source}: the model mixes dtypes across its decoder layers ({name} is {next(kinds)}, "
                                f"{first[0]} is {next(kinds)}); cast it to one, e.g. model.to(torch.float32)")


def check_full_precision(config, name: str) -> None:
    """A model to quantize is a full-precision one: a checkpoint whose config declares a quantization (a
    quantkit export, a GPTQ or compressed-tensors download) holds packed codes the solvers cannot start from."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        # a quantkit export with dense weights (--format fake) declares no quantization; its manifest says it
        # (quantkit.json: quantkit.export.common.MANIFEST, a floor above this one)
        if isinstance(name, (str, os.PathLike)) and Path(name, "quantkit.json").is_file():
            raise QuantkitError(f"{name} is a quantkit export (it holds quantkit.json): its weights are already rounded, "
                                "and quantizing them again rounds twice; quantize the full-precision model it was made "
                                "from (`quantkit export` converts a quantkit export to another format)")
        return
    method = qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method) or "quantized"
    raise QuantkitError(f"{name} is already quantized (its config.json has a {method} quantization_config); quantize "
                        "the full-precision model it was made from (`quantkit export` converts a quantkit export to "
                        "another format)")


# transformers' tasks whose classes generate text: what quantkit quantizes and exports
_GENERATIVE = ("CAUSAL_LM", "IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM")


def check_language_model(config, name: str) -> None:
    """A model to quantize is a language model: a config.json whose architectures names any class transformers
    builds for a task other than generating text (another task head such as LlamaForSequenceClassification, a bare
    LlamaModel, a masked LM) is refused; loaded as a causal LM it got an lm_head that the export's config, still
    naming that class, does not build. A class transformers does not know (remote code) is left to the adapter."""
    from transformers.models.auto import modeling_auto

    arch = (getattr(config, "architectures", None) or [None])[0]

    def classes(mapping: str) -> set[str]:
        return {c for v in getattr(modeling_auto, mapping, {}).values() for c in ((v,) if isinstance(v, str) else v)}

    generative = set().union(*(classes(f"MODEL_FOR_{task}_MAPPING_NAMES") for task in _GENERATIVE))
    if arch not in generative and any(arch in classes(m) for m in dir(modeling_auto) if m.endswith("_MAPPING_NAMES")):
        raise QuantkitError(f"{name}: config.json's architectures names {arch}, which transformers builds for another "
                            "task than generating text; quantkit quantizes language models (a causal LM or a "
                            "vision-language model): give one, or name the causal-LM class in architectures where the "
                            "weights are one")


def source_name(model: object) -> str:
    """The name a model is reported under: its path or hub id, or where a loaded model came from (its config's
    _name_or_path), else its class."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def check_model_weights(model: torch.nn.Module, source: str | None = None) -> None:
    """Every parameter of a loaded model is float and finite, and so is every float buffer its checkpoint stores
    (tied parameters checked once; the integer codes of an already quantized checkpoint are left alone)."""
    config = getattr(model, "config", None)
    source = source or source_name(model)
    packed = getattr(config, "quantization_config", None) is not None  # a quantized checkpoint's integer codes
    for name, param in model.named_parameters():
        if param.device.type == "meta" or (packed and not param.is_floating_point()):
            continue
        check_weight(name, param.detach(), source)
    stored = model.state_dict().keys()  # persistent buffers are weights too (DeepSeek-V3's e_score_correction_bias)
    for name, buffer in model.named_buffers():
        if name in stored and buffer.is_floating_point() and buffer.device.type != "meta":
            check_weight(name, buffer, source)
    for target, tied_to in tied_pairs(model):
        a, b = model.get_parameter(target), model.get_parameter(tied_to)
        if a is not b and "meta" not in (a.device.type, b.device.type) and not same_values(a.detach(), b.detach()):
            raise untied_error(source, target, tied_to)


def tied_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(tensor, the tensor it is tied to) of every tie the model's config asks for (tie_word_embeddings)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return []
    try:
        return sorted(expand(all_submodels=True).items())
    except (AttributeError, ValueError, TypeError):
        return []


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values (as transformers decides whether two stored tensors can be tied)."""
    if a.shape != b.shape:
        return False
    return torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.float(), b.float())


def untied_error(source: str, target: str, tied_to: str) -> QuantkitError:
    """A config that ties `target` to `tied_to` while the two hold different values."""
    return QuantkitError(
        f"{source}: the config sets tie_word_embeddings, but {target} is stored apart from {tied_to} with other "
        "values; transformers keeps the two apart, other loaders (vLLM, llama.cpp) use one for both, so the export "
        "would mean two models: set tie_word_embeddings to false in config.json, or drop the stored "
        f"{target} to tie them"
    )


def check_stored_dtypes(stored: Mapping[str, str], float_params: Iterable[str], source: str) -> None:
    """From safetensors headers only: each of `float_params` that the checkpoint stores (name -> header dtype)
    is stored as a float, not as integers transformers would cast and quantkit would quantize as values."""
    for name in float_params:
        dtype = stored.get(name)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise QuantkitError(
                f"{source}: weight {name} ({where_in_model(name)}) is stored as {dtype}, not as floats; quantkit "
                "quantizes float weights: save the model in float32, float16 or bfloat16"
            )


def check_bin_files(folder: Path, source: str, *, required: bool) -> None:
    """A model folder without safetensors: its pytorch_model*.bin tensors stored as floats, as check_stored_dtypes
    wants of safetensors headers (transformers casts an int32 tensor of a .bin to the parameter's dtype, so the
    loaded model cannot tell); no .bin at all is no weights where the folder is the user's (`required`)."""
    if not any(folder.glob("*.bin")):
        if required:
            raise QuantkitError(f"{source} has no weights (no model.safetensors, index or .bin files)")
        return
    for path in sorted(folder.glob("pytorch_model*.bin")):
        state = None
        for mmap in (True, False):  # memory-mapped: the dtypes without reading the values (a legacy .bin cannot be)
            try:
                state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
                break
            except Exception:  # noqa: BLE001 - a .bin in another form is its loader's to judge
                continue
        if isinstance(state, Mapping):
            stored = {k: "F32" if v.is_floating_point() else str(v.dtype).removeprefix("torch.")
                      for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            check_stored_dtypes(stored, [k for k in stored if k.endswith((".weight", ".bias"))], f"{source} ({path.name})")


def check_weight_files(files: Iterable[str | os.PathLike], source: str) -> None:
    """Every float tensor of these safetensors files is finite, read one tensor at a time (for runs that
    stream layers from disk and so never hold the whole model)."""
    from safetensors import safe_open

    for path in files:
        with safe_open(os.fspath(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    check_weight(key, tensor, f"{source} ({Path(path).name})")


def check_vocabulary(tokens: object, rows: int | None, what: str) -> None:
    """A tokenizer of `tokens` ids fits an embedding of `rows`: no id past the last row, and not so few ids that
    most rows would never be read (models pad their vocabulary by a few percent at most; a tokenizer covering
    less than half of it belongs to another model, and its ids mean other words to this one). `tokens` is the
    tokenizer itself (its highest id is checked too) or its number of ids."""
    if rows is None:
        return
    if not isinstance(tokens, int):  # the tokenizer itself: its ids may run past its length (gaps in a vocabulary)
        tokenizer, tokens = tokens, len(tokens)
        try:
            highest = max([tokens - 1, *tokenizer.get_vocab().values()])
        except (AttributeError, TypeError, ValueError):
            highest = tokens - 1
        if highest >= rows and tokens <= rows:
            raise QuantkitError(f"{what} has {tokens} tokens but ids up to {highest}, past the model's embedding of "
                                f"{rows} rows; the vocabulary has gaps or belongs to another model: give the model's "
                                "own tokenizer")
    if tokens > rows:
        raise QuantkitError(f"{what} has {tokens} tokens but the model's embedding holds {rows}; they do not "
                            "belong together: give the model's own tokenizer")
    if tokens < rows / 2:
        raise QuantkitError(f"{what} has {tokens} tokens but the model's embedding holds {rows}: most of the "
                            "model's vocabulary would never be used, so the tokenizer is another model's; give the "
                            "model's own tokenizer")


def embedding_rows(model_or_config: object) -> int | None:
    """Rows of a model's input embedding (a loaded model's, else its config's vocab_size; a VLM's text model's)."""
    if isinstance(model_or_config, torch.nn.Module) and hasattr(model_or_config, "get_input_embeddings"):
        try:
            return int(model_or_config.get_input_embeddings().num_embeddings)
        except (AttributeError, NotImplementedError, TypeError):
            pass
    config = getattr(model_or_config, "config", model_or_config)
    for cfg in (getattr(config, "text_config", None), config):
        value = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_tokenizer_fits(tokenizer_or_processor: object, model_or_config: object,
                         what: str = "the tokenizer given (tokenizer_or_processor=)") -> None:
    """A given tokenizer (or a processor's) fits the model's embedding (check_vocabulary)."""
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    try:
        len(tokenizer)
    except TypeError:
        return  # not a tokenizer: the data's reader says what it needs
    check_vocabulary(tokenizer, embedding_rows(model_or_config), what)
    check_tokenizer_reads(tokenizer, what)


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "num_experts_per_tok")


def _sub_configs(config: object, prefix: str = "") -> Iterable[tuple[str, object]]:
    """(field prefix, config) of a config and every config nested in it (a VLM's text_config, vision_config)."""
    yield prefix, config
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type") and value is not config:
            yield from _sub_configs(value, f"{prefix}{key}.")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rope_fields(cfg: object) -> Iterable[tuple[str, object]]:
    """(field, value) of every rope_theta and scaling factor: flat, in rope_parameters, or per layer type."""
    if _number(getattr(cfg, "rope_theta", None)):
        yield "rope_theta", cfg.rope_theta
    params = getattr(cfg, "rope_parameters", None)
    tables = [("rope_parameters", params)] if isinstance(params, Mapping) else []
    if isinstance(params, Mapping):
        tables += [(f"rope_parameters.{k}", v) for k, v in params.items() if isinstance(v, Mapping)]
    for where, table in tables:
        for key in ("rope_theta", "factor"):
            if _number(table.get(key)):
                yield f"{where}.{key}", table[key]


def check_config_values(config: object, source: str) -> None:
    """Values no model runs with, refused by field before anything is built: a norm epsilon outside (0, 1), a
    rope_theta or rope scaling factor <= 0, a size <= 0, key/value heads that do not divide the attention heads, a
    negative bos/eos token id (generation would index the embedding with it), a vision_feature_layer past the
    vision tower, a NaN anywhere or an infinite number of its own (routed_scaling_factor NaN).
    transformers builds such models and they compute NaN or noise quietly."""
    def refuse(field: str, value: object, why: str) -> QuantkitError:
        return QuantkitError(f"{source}: config field {field} is {value!r}; {why}: fix config.json")

    for prefix, cfg in _sub_configs(config):
        fields = vars(cfg)
        for key, value in fields.items():
            if _number(value) and ("norm" in key or "rms" in key) and key.endswith(("_eps", "_epsilon")):
                if not (math.isfinite(value) and 0 < value < 1):
                    raise refuse(prefix + key, value, "a norm's epsilon is a small positive number (1e-5, 1e-6)")
        for key, value in _rope_fields(cfg):
            if not (math.isfinite(value) and value > 0):
                raise refuse(prefix + key, value, "rotary embeddings need a positive finite value")
        for key in _SIZES:
            value = fields.get(key)
            if _number(value) and value <= 0:
                raise refuse(prefix + key, value, "a size must be positive")
        for key in ("bos_token_id", "eos_token_id", "decoder_start_token_id"):  # pad_token_id: nn.Embedding's check
            ids = getattr(cfg, key, None)
            if any(_number(token) and token < 0 for token in (ids if isinstance(ids, list | tuple) else [ids])):
                raise refuse(prefix + key, ids, "a token id is a row of the embedding, 0 or more")
        heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
        if _number(heads) and _number(kv) and heads > 0 and kv > 0 and heads % kv:
            raise refuse(prefix + "num_key_value_heads", kv, f"it must divide num_attention_heads ({heads})")
        window = fields.get("sliding_window")
        sliding = "sliding_attention" in (fields.get("layer_types") or ()) or fields.get("use_sliding_window", (
            hasattr(type(cfg), "sliding_window") and not fields.get("layer_types"))) is True  # declared, no switch: Mistral
        if sliding and _number(window) and window <= 0:  # where no layer slides, 0 is a placeholder (qwen2_moe)
            raise refuse(prefix + "sliding_window", window, "its sliding-window layers would attend to no token")
        tower = getattr(getattr(cfg, "vision_config", None), "num_hidden_layers", None)
        picks = fields.get("vision_feature_layer")
        for pick in picks if isinstance(picks, list | tuple) else [picks]:  # an index into the tower's hidden states
            if _number(tower) and _number(pick) and not -tower - 1 <= pick <= tower:
                raise refuse(prefix + "vision_feature_layer", picks, f"the vision tower has {tower} layers, so "
                             f"{tower + 1} hidden states (the embeddings' first): an index from {-tower - 1} to {tower}")
        for key, value in fields.items():  # after the fields' own rules above, which say more of theirs
            inner = value.values() if isinstance(value, Mapping) else value if isinstance(value, list | tuple) else ()
            if (isinstance(value, float) and not math.isfinite(value)) or any(
                    isinstance(v, float) and math.isnan(v) for v in inner):  # an infinite bound in a list is a limit
                raise refuse(prefix + key, value, "a model computes with finite numbers (NaN reaches every output)")


def size_fields(config: object, values: Iterable[int]) -> list[tuple[str, int]]:
    """(field, value) of every integer field of a config (a PretrainedConfig or config.json's dict, nested configs as
    `text_config.vocab_size`) whose value is one of `values`: the fields that can have set a tensor dimension."""
    wanted, found = set(values), []

    def walk(table: Mapping, prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, int) and not isinstance(value, bool) and value in wanted and not key.endswith(("_id", "_ids")):
                found.append((prefix + key, value))

    to_dict = getattr(config, "to_dict", None)
    walk(to_dict() if callable(to_dict) else config if isinstance(config, Mapping) else {}, "")
    return found


def config_shape_error(source: str, tensor: str, stored: Iterable[int], expected: Iterable[int], where: str,
                       config: object, fix: str) -> QuantkitError:
    """A tensor stored in one shape where config.json makes it another, with the config fields that give the
    dimensions that differ (vocab_size = 80 over 64 stored rows)."""
    stored, expected = list(stored), list(expected)
    differ = [e for i, e in enumerate(expected) if i >= len(stored) or stored[i] != e]
    fields = ", ".join(f"{k} = {v}" for k, v in size_fields(config, differ))
    named = f" (config.json's {fields})" if fields else ""
    return QuantkitError(f"{source}: tensor {tensor} is {stored} in {where} but config.json makes it {expected}{named}; "
                         f"{fix}")


def stored_twice(index: Path, key: str, first: str, second: str, named: object) -> QuantkitError:
    """A tensor two shards hold: loaders differ on which copy they read (transformers the index's, a reader of
    every shard the last), so the checkpoint means two models."""
    return QuantkitError(f"{index.parent}: tensor {key} is stored twice, in {first} and in {second} ({index.name} "
                         f"names {named}); loaders differ on which copy they read: the checkpoint is damaged, save or "
                         "export it again")


def check_config_aliases(raw: Mapping, config: object, source: str) -> None:
    """config.json does not give one setting two values under two of its names (transformers' attribute_map:
    Qwen3-MoE's num_experts is num_local_experts); transformers keeps one of them silently."""
    for prefix, cfg in _sub_configs(config):
        table = raw
        for key in filter(None, prefix.rstrip(".").split(".")):
            table = table.get(key) if isinstance(table, Mapping) else None
        if not isinstance(table, Mapping):
            continue
        for alias, name in (getattr(type(cfg), "attribute_map", None) or {}).items():
            if alias in table and name in table and table[alias] != table[name]:
                raise QuantkitError(f"{source}: config.json sets {prefix}{alias} = {table[alias]!r} and "
                                    f"{prefix}{name} = {table[name]!r}, two names of one setting; the model is built "
                                    f"with {getattr(cfg, name, None)!r}: keep one of them in config.json")
        # the older top-level rope_theta beside rope_parameters' (transformers 5 reads the latter alone): an edit of
        # the first changed nothing the model computes, though other loaders read it
        rope = table.get("rope_parameters")
        if isinstance(rope, Mapping) and "rope_theta" in rope and "rope_theta" in table \
                and table["rope_theta"] != rope["rope_theta"]:
            raise QuantkitError(f"{source}: config.json sets {prefix}rope_theta = {table['rope_theta']!r} and "
                                f"{prefix}rope_parameters.rope_theta = {rope['rope_theta']!r}, two places of one "
                                "setting; the model is built with the second: keep one of them in config.json")


def check_tokenizer_reads(tokenizer: object, what: str) -> None:
    """A tokenizer reads back text made of its own vocabulary: 64 of its ordinary tokens (spread over the
    vocabulary) are decoded and encoded again, and must come back as tokens, most of them known. A tokenizer
    class that does not fit its tokenizer.json (a GPT-2 class over a word-level file encodes any text to
    nothing) or another tokenizer's files fail here, before its ids calibrate anything or its files are exported."""
    try:
        size = len(tokenizer)
        skip = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or ())
    except (TypeError, AttributeError):
        return  # not a tokenizer: the data's reader says what it needs
    ordinary = [i for i in range(size) if i not in skip]
    picked = ordinary[:: max(1, len(ordinary) // 64)][:64]
    if not picked:
        return
    text = tokenizer.decode(picked, skip_special_tokens=True)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text.strip() else []
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(1 for i in ids if i == unk) if unk is not None else 0
    if not ids or 2 * unknown > len(ids):
        got = "no tokens" if not ids else f"{unknown} of {len(ids)} tokens unknown ({tokenizer.unk_token})"
        raise QuantkitError(
            f"{what} ({type(tokenizer).__name__}) cannot read its own vocabulary: text decoded from {len(picked)} of "
            f"its tokens encodes to {got}; its class does not fit its files (tokenizer_class in "
            "tokenizer_config.json) or the files are broken: save the tokenizer again"
        )
