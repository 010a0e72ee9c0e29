"""Deriving a model's Adapter from the model itself: no per-family table of module names.

- The decoder layers: the one ModuleList of repeated blocks in the text decoder (transformers'
  get_decoder: the base model, or a VLM's language model).
- Embeddings and head: transformers' get_input_embeddings / get_output_embeddings.
- What each layer receives and what runs after the last one: the model is run on a probe input
  with every decoder layer replaced by a pass-through that records its arguments
  (passthrough_layers; the engine captures calibration inputs the same way), so per-layer
  arguments (sliding-window masks, per-type rotary tables) are seen layer by layer; the modules
  that run after the last layer are the final norm, and before it, where there are several, a
  chain of full-precision modules each reading the one before (DeepSeek-V4's hyper-connection head).
- Each layer's linears: one layer of each structure runs alone on its recorded arguments with
  hooks on its nn.Linear modules: the call order is the solve order, and linears reading the very
  same input tensor form one group (one Hessian). A layer whose weights are on the meta device
  runs on meta tensors, or, where an operation needs values (routing), as a copy with random
  weights.
- Mixture-of-experts blocks (a module with 3-D fused expert weights, or a ModuleList of experts)
  are found by structure and left to the MoE path (LayerLayout.experts) with their router; every
  other weight that is not an nn.Linear is named with why it stays in full precision; a model
  that cannot be handled gets one QuantkitError line naming what was not found.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.base import Adapter, ExpertBlock, Family, LayerLayout, get_module, layer_output
from quantkit.models.experts import RoutedExperts, with_expert_groups
from quantkit.models.probe import (
    StopForward,
    error_line,
    outside_layers_on_cpu,
    passthrough_layers,
    probe_layer,
    probe_sample,
)


def _module_path(model: nn.Module, target: nn.Module | None, what: str, accessor: str) -> str:
    if target is None:
        raise QuantkitError(f"{type(model).__name__} has no {what} ({accessor} gives none)")
    for name, module in model.named_modules():
        if module is target and name:
            return name
    raise QuantkitError(f"{type(model).__name__}'s {what} ({accessor}) is not one of its modules")


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """The text decoder: get_decoder()'s module, or the base model where that holds no layers (an LM head
    named `decoder`)."""
    try:
        candidates = [model.get_decoder()]
    except Exception:  # noqa: BLE001 - transformers raises for models without one rule
        candidates = []
    candidates += [getattr(model, "base_model", model), model]
    decoder = next(c for c in candidates if isinstance(c, nn.Module) and any(
        isinstance(m, nn.ModuleList) for m in c.modules()) or c is model)
    if decoder is model:
        return "", model
    return _module_path(model, decoder, "text decoder", "get_decoder"), decoder


def _layer_stack(model: nn.Module, decoder_path: str, decoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the outermost ModuleList of blocks under the decoder, the one
    as long as the config's layer count where there are several."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in decoder.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or any(name.startswith(s + ".") for s, _ in stacks):
            continue
        if any(p.numel() for p in module.parameters()):
            stacks.append((name, module))
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(text, "num_hidden_layers", None)
    if len(stacks) > 1:
        stacks = [s for s in stacks if len(s[1]) == count] or stacks
    where = type(decoder).__name__
    if not stacks:
        raise QuantkitError(f"no ModuleList of decoder layers found in {where}")
    if len(stacks) > 1:
        found = ", ".join(f"{name} ({len(m)})" for name, m in stacks)
        raise QuantkitError(f"{where} holds several stacks of layers ({found}); quantkit calibrates models "
                            "with one stack of decoder layers")
    name, stack = stacks[0]
    return (f"{decoder_path}.{name}" if decoder_path else name), stack


def _signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures share their layout (the same modules, classes and weight shapes)."""
    return tuple((name, type(m).__name__, tuple((p, tuple(t.shape)) for p, t in m.named_parameters(recurse=False)))
                 for name, m in layer.named_modules())


def _expert_containers(layer: nn.Module) -> dict[str, int]:
    """Layer-relative paths of the modules holding experts -> number of experts: a module named for experts
    (by its class or its attribute) with 3-D (fused) weights, or a ModuleList named for experts."""
    found: dict[str, int] = {}
    for name, module in layer.named_modules():
        if any(name.startswith(f + ".") for f in found) or isinstance(module, nn.modules.conv._ConvNd):
            continue
        named = "expert" in type(module).__name__.lower() or "expert" in name.rsplit(".", 1)[-1]
        fused = [p for p in module.parameters(recurse=False) if p.dim() >= 3]
        if fused and named:
            found[name] = fused[0].shape[0]
        elif isinstance(module, nn.ModuleList) and named and len(module):
            found[name] = len(module)
    return found


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _router(layer: nn.Module, block: str, experts: str, count: int) -> str | None:
    """The router of an expert block: a child scoring every expert (a linear or a module with a 2-D weight)."""
    holder = get_module(layer, block) if block else layer
    for child_name, child in holder.named_children():
        path = f"{block}.{child_name}" if block else child_name
        if path == experts:
            continue
        # its own 2-D weight, or that of the one linear it wraps (Ergo's gate.linear)
        weights = [p for p in child.parameters(recurse=False) if p.dim() == 2]
        if not weights and len(list(child.parameters())) <= 2:
            weights = [p for p in child.parameters() if p.dim() == 2]
        if isinstance(child, nn.Linear) and child.out_features == count or not isinstance(child, nn.Linear) and any(
                w.shape[0] == count for w in weights):
            return path
    return None


def layer_layout(layer: nn.Module, args: tuple, kwargs: dict, where: str) -> tuple[LayerLayout, object]:
    """One decoder layer's LayerLayout from a run on its recorded call (`where`: its path, for messages);
    also the layer's output (what the model receives from it)."""
    containers = _expert_containers(layer)
    blocks = {_parent(c) or c: c for c in containers}
    routers = {block: _router(layer, block, experts, containers[experts]) for block, experts in blocks.items()}
    gates = {name for name, m in layer.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == 1 and _parent(name) in blocks}

    def watch(module: nn.Module, events: list) -> list:
        handles = []
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                handles.append(sub.register_forward_pre_hook(
                    lambda mod, a, name=name: events.append(("linear", name, a[0] if a else None))))
            if name in blocks:
                handles.append(sub.register_forward_pre_hook(lambda mod, a, name=name: events.append(("block", name, None))))
        return handles

    out, events = probe_layer(layer, args, kwargs, watch)
    full_precision: list[tuple[str, str]] = []
    groups: list[list[str]] = []
    group_of_input: list[tuple[object, int]] = []
    positions: dict[str, int] = {}
    called: set[str] = set()
    for kind, name, x in events:
        if kind == "block":
            positions.setdefault(name, len(groups))
            continue
        if any(_under(name, c) for c in containers) or any(_under(name, r) for r in routers.values() if r) or name in gates:
            continue
        if name in called:
            raise QuantkitError(f"{where}.{name} runs more than once in one pass of its layer; quantkit solves each "
                                "linear on one input")
        called.add(name)
        index = next((i for tensor, i in group_of_input if tensor is x), None)
        if index is None:
            group_of_input.append((x, len(groups)))
            groups.append([name])
        else:
            groups[index].append(name)
    for name, module in layer.named_modules():
        if any(_under(name, c) for c in containers) or any(name.startswith(f"{r}.") for r in routers.values() if r):
            continue
        if name in routers.values():
            full_precision.append((name, "router of a mixture-of-experts block, kept in full precision"))
            continue
        if isinstance(module, nn.Linear) and module.out_features == 1 and _parent(name) in blocks:
            full_precision.append((name, "a one-output gate of a mixture-of-experts block, kept in full precision"))
            continue
        if isinstance(module, nn.Linear):
            if name not in called:
                full_precision.append((name, "an nn.Linear not called on a probe input (its weight read directly, or its branch not taken)"))
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            path = f"{name}.{pname}" if name else pname
            if isinstance(module, nn.modules.conv._ConvNd):
                full_precision.append((path, "a convolution (recurrent / state-space kernel), kept in full precision"))
            elif isinstance(module, nn.Embedding):
                full_precision.append((path, "an embedding inside the layer, kept in full precision"))
            else:
                full_precision.append((path, f"a {type(module).__name__} weight that is not an nn.Linear, kept in "
                                             "full precision"))
    # one entry per experts module (a block may hold two: Inkling's routed and shared experts), so each is checked
    experts = tuple(ExpertBlock(_parent(c) or c, c, routers[_parent(c) or c], positions.get(_parent(c) or c, len(groups)))
                    for c in containers)
    split = {(b.position, b.block) for b in experts if isinstance(get_module(layer, b.experts), RoutedExperts)}
    for position, block in sorted(split, reverse=True):  # the last first: earlier positions stay valid
        groups = with_expert_groups(groups, layer, block, position)  # per-expert linears, solved as any other
    return LayerLayout(tuple(tuple(g) for g in groups), experts, tuple(full_precision)), out


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def _vision_modules(model: nn.Module, excluded: list[str]) -> tuple[str, ...]:
    """The outermost modules (and loose parameters) holding weights outside the text decoder and the head."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_under(name, e) or _under(e, name) for e in excluded):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        if any(True for _ in module.parameters()):
            found.append(name)
    for name, _ in model.named_parameters():
        owner = _parent(name)
        if not any(_under(name, f) for f in found) and not any(_under(name, e) for e in excluded) and \
                any(_under(e, owner) for e in excluded):
            found.append(name)
    return tuple(found)


def is_image_text(config) -> bool:
    """Whether a config describes an image-text model (a vision side beside the text decoder)."""
    return getattr(config, "vision_config", None) is not None


def derive_adapter(model: nn.Module, family: Family | None = None) -> Adapter:
    """The Adapter of a loaded (or meta-device) transformers model; `family` adds smoothing folds (and,
    where given, the vision modules). Raise QuantkitError with one line naming what was not found."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    try:
        return _derive(model, family, model_type)
    except QuantkitError as err:
        raise QuantkitError(f"unsupported architecture {model_type!r}: {err}") from None


@torch.no_grad()
def _derive(model: nn.Module, family: Family | None, model_type: str) -> Adapter:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise QuantkitError("an encoder-decoder model; quantkit calibrates decoder-only language models and "
                            "image-text models")
    decoder_path, decoder = _decoder(model)
    layers_path, layers = _layer_stack(model, decoder_path, decoder)
    if "encoder" in layers_path.split("."):
        raise QuantkitError(f"its layers ({layers_path}) are an encoder stack (BERT-style); quantkit calibrates "
                            "decoder-only language models and image-text models")
    embeddings = _module_path(model, model.get_input_embeddings(), "input embeddings", "get_input_embeddings")
    lm_head = _module_path(model, model.get_output_embeddings(), "output head", "get_output_embeddings")
    sample = probe_sample(config)
    calls: dict[int, tuple[tuple, dict]] = {}

    def record(index: int, args: tuple, kwargs: dict) -> None:
        calls[index] = (args, dict(kwargs))
        events.append(("layer", index))

    def run(**inputs) -> None:
        try:
            model(**sample, use_cache=False, **inputs)
        except StopForward:
            pass
        except QuantkitError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the model's own forward is one line
            raise QuantkitError(f"a probe forward with its decoder layers passed through fails: "
                                f"{error_line(err)}") from None

    def stop(module: nn.Module, args: tuple) -> None:
        raise StopForward

    events: list = []
    ran: dict[str, tuple[list, object]] = {}  # each module's last call: its arguments and output
    with outside_layers_on_cpu(model, layers):
        with passthrough_layers(layers, 0, record, stop_after=0):
            run()
        first_out = _probe_only_output(layers[0], *calls[0])
        items = len(first_out) if isinstance(first_out, (tuple, list)) else 0
        # every layer's call, and the modules that run after the last one (the final norm)
        calls.clear()
        events.clear()
        handles = [get_module(model, lm_head).register_forward_pre_hook(stop)]
        for name, module in decoder.named_modules():
            full = f"{decoder_path}.{name}" if decoder_path and name else (name or decoder_path)
            # parameter-free modules too: OLMo's final LayerNorm has no weights; dropout changes nothing in eval
            if not name or _under(full, layers_path) or isinstance(module, (nn.Dropout, nn.Identity)):
                continue
            handles.append(module.register_forward_pre_hook(lambda mod, a, full=full: events.append(("module", full))))
            handles.append(module.register_forward_hook(
                lambda mod, a, kw, out, full=full: ran.__setitem__(full, ([*a, *kw.values()], out)), with_kwargs=True))
        try:
            with passthrough_layers(layers, items, record):
                run()
        finally:
            for handle in handles:
                handle.remove()
    last = max((i for i, e in enumerate(events) if e[0] == "layer"), default=-1)
    tail = _outermost([e[1] for e in events[last + 1:] if e[0] == "module" and e[1] != lm_head])
    if len(tail) > 1:
        _check_chain(tail, ran, calls[max(calls)])
    final_norm = tail[-1] if tail else None
    missing = [i for i in range(len(layers)) if i not in calls]
    if missing:
        raise QuantkitError(f"decoder layer {missing[0]} of {layers_path} did not run on a probe input")
    layouts: dict[tuple, LayerLayout] = {}
    per_layer = []
    with outside_layers_on_cpu(model, layers):
        for index, layer in enumerate(layers):
            signature = _signature(layer)
            if signature not in layouts:
                layouts[signature] = layer_layout(layer, *calls[index], f"{layers_path}.{index}")[0]
            per_layer.append(layouts[signature])
    owner: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for name in per_layer[index].linear_names():
            first = owner.setdefault(id(get_module(layer, name)), index)
            if first != index:
                raise QuantkitError(f"{layers_path}.{index}.{name} is also a module of layer {first} (weights shared "
                                    "across layers); quantkit solves each layer's linears once")
    if not any(layout.groups or layout.experts for layout in per_layer):
        raise QuantkitError("its decoder layers hold no nn.Linear that runs; nothing to quantize")
    vision: tuple[str, ...] = ()
    if family is not None and family.vision is not None:
        vision = family.vision
    elif is_image_text(config):
        vision = _vision_modules(model, [p for p in (decoder_path, lm_head, embeddings) if p])
    return Adapter(
        name=model_type,
        model_types=(model_type,),
        layers=layers_path,
        embeddings=embeddings,
        final_norm=final_norm,
        before_norm=tuple(tail[:-1]),
        lm_head=lm_head,
        layouts=tuple(per_layer),
        vision=vision,
        smooth_folds=family.smooth_folds if family is not None else (),
        layer_output_items=items,
        decoder=decoder_path,
    )


def _check_chain(tail: list[str], ran: dict[str, tuple[list, object]], last_call: tuple[tuple, dict]) -> None:
    """Several modules after the last decoder layer (DeepSeek-V4's hyper-connection head, then the norm) are
    replayed as one chain: each must read the output of the one before it (the first, the last layer's output)
    and no other tensor."""
    args, kwargs = last_call
    previous = args[0] if args else kwargs.get("hidden_states")
    for name in tail:
        inputs, output = ran[name]
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        if len(tensors) != 1 or tensors[0] is not previous:
            raise QuantkitError(f"after its last decoder layer it runs {', '.join(tail)} before the head, and {name} "
                                "reads more than the output of the module before it; quantkit cannot replay that")
        previous = output


def _probe_only_output(layer: nn.Module, args: tuple, kwargs: dict) -> object:
    """What decoder layer `layer` returns on its recorded call (a tensor, or a tuple led by one)."""
    out, _ = probe_layer(layer, args, kwargs, lambda module, events: [])
    layer_output(out)
    return out
