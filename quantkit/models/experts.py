"""Mixture-of-experts layers as per-expert linears, so each expert is quantized on the tokens routed to it.

transformers 5 keeps a layer's experts as fused 3-D parameters (`gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I]; gpt-oss and Llama 4 store them transposed, gpt-oss with gate and up columns interleaved and
with biases) and runs them through an "experts implementation" (grouped_mm by default) that no per-module
hook can see into. `unfuse_experts` replaces each such module by RoutedExperts: one Expert per expert with
an nn.Linear per projection, run by the routing loop of transformers' eager implementation (same token
order, same weighting, same index_add), so the layer computes what it computed before. Each projection is
an ExpertLinear whose `routed_tokens` holds, during a call, the flat indices of the layer's tokens that the
call carries: the engine weighs each expert's Hessian with those tokens' weights.

Projection names follow the family's checkpoint (read from transformers' conversion mapping: Mixtral's
w1 / w3 / w2, the Qwen-MoE / DeepSeek / OLMoE families' gate_proj / up_proj / down_proj), so the model's
state dict has the checkpoint's per-expert keys (up to transformers' renamings) and an export stores
experts as the family's checkpoints do; families whose checkpoints keep experts fused (gpt-oss, Llama 4)
get gate_proj / up_proj / down_proj, the per-expert quantized layout of llm-compressor, GPTQModel and
transformers' compressed-tensors loader. As there, `gate_proj` and `up_proj` are the first and second half
of the fused gate_up output: for gpt-oss, whose gate and up columns alternate, each half holds both (the
family's own gate function reads the halves joined back). Routers stay as they are (full precision);
`fuse_experts` puts the fused modules back. Families whose experts run their own loop without transformers' flags
are named in FLAGLESS_EXPERTS with their layout: DBRX (three 2-D [E * I, H] parameters), Inkling (routed experts,
and shared experts that every token runs, weighted per token: SharedExperts).

With `all_tokens` (set_all_tokens), every expert runs on every token of the layer, so a rarely chosen
expert still gets statistics, while the layer's output keeps only the routed tokens' results.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.expert_layout import (
    FLAGLESS_EXPERTS,
    ExpertNames,
    FusedLayout,
    activation_of,
    expert_names,
    fused_layout,
    is_llama4_experts,
    join_experts,
    split_fused,
)


class ExpertLinear(nn.Linear):
    """One projection of one expert. While the expert runs, `routed_tokens` holds the flat indices (into the
    layer's [batch * tokens] input) of the tokens this call carries, in the order of the call's rows."""

    routed_tokens: torch.Tensor | None = None
    chosen_rows: torch.Tensor | None = None  # under all_tokens: whether the router chose this expert for each row


class Expert(nn.Module):
    """One expert: its projections as ExpertLinear modules, named as the checkpoint names them."""

    def __init__(self, names: ExpertNames, hidden: int, intermediate: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.names = names
        for name in names.all():
            width_in, width_out = (intermediate, hidden) if name == names.down else (hidden, intermediate)
            self.add_module(name, ExpertLinear(width_in, width_out, bias=bias, dtype=dtype, device=device))

    def projections(self) -> list[ExpertLinear]:
        """The expert's linears in execution order."""
        return [getattr(self, name) for name in self.names.all()]


def _gate_owner(fused: nn.Module, layout: FusedLayout) -> types.SimpleNamespace:
    """What a family's gate function reads from its experts module (act_fn, alpha, limit...), without the
    module's parameters (so the fused weights are not kept alive)."""
    internals = vars(nn.Module())
    attrs = {k: v for k, v in vars(fused).items() if k not in internals}
    attrs.update({k: _without_fused(m, k, layout) for k, m in fused._modules.items()})
    return types.SimpleNamespace(**attrs)


def _without_fused(module: nn.Module | None, name: str, layout: FusedLayout) -> nn.Module | None:
    """Child `name` of an experts module as it is, or, where it holds fused expert weights (DBRX's mlp.w1...), a
    shallow copy without them (a post-expert norm keeps its own weight)."""
    fused = {key.split(".", 1)[1] for key in layout.fused_names() if key.startswith(name + ".")}
    if module is None or not fused:
        return module
    bare = copy.copy(module)
    bare._parameters = {k: v for k, v in module._parameters.items() if k not in fused}
    return bare


class RoutedExperts(nn.ModuleList):
    """A layer's experts as a list of Expert modules, routed as transformers' eager experts loop routes.

    Called as the fused module is: (hidden [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H].
    With `scaled_inputs` (Llama 4) the routing weight scales an expert's input instead of its output.
    """

    def __init__(self, experts: list[Expert], layout: FusedLayout, gate_fn: Callable | None,
                 act_fn: nn.Module | None, post_norm: nn.Module | None, fused_class: type,
                 fused_attrs: types.SimpleNamespace, scaled_inputs: bool = False) -> None:
        super().__init__(experts)
        self.layout = layout
        self._gate_fn = gate_fn  # (gate_up [.., 2I] laid out as the fused module lays it) -> [.., I]
        self.act_fn = act_fn
        self.post_expert_norm = post_norm
        self.fused_class = fused_class  # what fuse_experts rebuilds, with these attributes
        self.fused_attrs = fused_attrs
        self.scaled_inputs = scaled_inputs
        self.all_tokens = False
        self.routed_counts: torch.Tensor | None = None  # tokens routed to each expert, while the engine counts

    @property
    def num_experts(self) -> int:
        """How many experts the layer has."""
        return sum(1 for _ in self.experts())

    def __len__(self) -> int:
        return self.num_experts  # the activation and norm modules the list also holds are not experts

    def __iter__(self) -> Iterator[Expert]:
        return self.experts()

    def experts(self) -> Iterator[Expert]:
        """The Expert modules (the list also holds the activation and norm modules)."""
        return (m for m in self._modules.values() if isinstance(m, Expert))

    def _activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if gate is None:
            return self.act_fn(up)
        # the two halves side by side are the fused gate_up output, which the family's own gate function reads
        return self._gate_fn(torch.cat([gate, up], dim=-1))

    def run_expert(self, index: int, x: torch.Tensor, tokens: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Expert `index` on rows `x`, which are the layer's flat tokens `tokens` (`chosen`: ExpertLinear.chosen_rows)."""
        expert = self[index]
        for linear in expert.projections():
            linear.routed_tokens, linear.chosen_rows = tokens, chosen
        try:
            names = expert.names
            gate = getattr(expert, names.gate)(x) if names.gate is not None else None
            y = getattr(expert, names.down)(self._activate(gate, getattr(expert, names.up)(x)))
            if self.post_expert_norm is not None:  # Ergo's holds one scale per expert, picked by expert id
                ids = (torch.full((y.shape[0],), index, device=y.device),) if _takes_expert_ids(self.post_expert_norm) else ()
                y = self.post_expert_norm(y, *ids)
        finally:
            for linear in expert.projections():
                linear.routed_tokens = linear.chosen_rows = None
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                every_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' weighted sum for every token (`every_weight` [N, E]: each expert's input scale on every
        token, for scaled inputs in all-tokens mode)."""
        shape = hidden_states.shape  # DBRX hands its experts [batch, tokens, H]
        hidden_states = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(hidden_states)
        every = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        num_experts = self.num_experts
        if self.routed_counts is not None:  # ids past the last expert are expert-parallel sentinels
            counts = torch.bincount(top_k_index.flatten().cpu(), minlength=num_experts + 1)[:num_experts]
            self.routed_counts = self.routed_counts + counts
        for index in range(num_experts):
            # eager's order: by top-k slot, then by token
            slot, tokens = torch.where((top_k_index == index).transpose(0, 1))
            if tokens.numel() == 0 and not self.all_tokens:
                continue
            weights = top_k_weights[tokens, slot, None]
            chosen = torch.isin(every, tokens) if self.all_tokens else None
            if self.scaled_inputs and self.all_tokens:
                scale = every_weight[:, index, None].to(hidden_states.dtype)
                y = self.run_expert(index, hidden_states * scale, every, chosen)[tokens]
            elif self.scaled_inputs:
                y = self.run_expert(index, hidden_states[tokens] * weights.to(hidden_states.dtype), tokens)
            elif self.all_tokens:
                y = self.run_expert(index, hidden_states, every, chosen)[tokens] * weights
            else:
                y = self.run_expert(index, hidden_states[tokens], tokens) * weights
            out.index_add_(0, tokens, y.to(out.dtype))
        return out.view(shape)


def _takes_expert_ids(norm: nn.Module) -> bool:
    return len(inspect.signature(norm.forward).parameters) > 1


class SharedExperts(RoutedExperts):
    """Experts that every token runs, each one's output scaled by the token's weight for it: Inkling's shared
    experts, called as (hidden [.., H], gammas [.., E]) (its gammas scale the down projection's input, which is
    the same map, down being linear)."""

    def forward(self, hidden_states: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
        """The experts' gamma-weighted sum for every token."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        count = self.num_experts
        every = torch.arange(count, device=flat.device).expand(flat.shape[0], count)
        return super().forward(flat, every, gammas.reshape(-1, count).to(flat.dtype)).view(hidden_states.shape)


class RoutedLlama4Moe(nn.Module):
    """Llama 4's MoE block with RoutedExperts: the router's top-k choice and sigmoid scores scale each
    chosen expert's input, the shared expert adds its output (Llama4TextMoe's computation, routed per expert)."""

    def __init__(self, block: nn.Module, experts: RoutedExperts) -> None:
        super().__init__()
        self.top_k, self.hidden_dim, self.num_experts = block.top_k, block.hidden_dim, block.num_experts
        self.router = block.router
        self.experts = experts
        self.shared_expert = block.shared_expert
        self.fused_block_class = type(block)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [N, H], router logits), as Llama4TextMoe returns them."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        scores, logits = self.router(hidden_states)
        top_k_index = torch.topk(logits, self.top_k, dim=1).indices
        every = torch.sigmoid(logits.float()).to(scores.dtype)  # what each expert's input would be scaled by
        routed = self.experts(hidden_states, top_k_index, scores.gather(1, top_k_index), every)
        out = self.shared_expert(hidden_states)
        out.add_(routed)
        return out, logits


# ---------------------------------------------------------------- finding and replacing fused modules


def _routed_experts(fused: nn.Module, layout: FusedLayout, names: ExpertNames, scaled_inputs: bool) -> RoutedExperts:
    """A RoutedExperts holding `fused`'s weights (on its device: meta stays meta)."""
    if not layout.gated:  # up and down only (Nemotron-H's squared-ReLU experts)
        names = ExpertNames(gate=None, up=names.up, down=names.down)
    keys = layout.fused_names()
    gate_up = fused.get_parameter(keys[0])
    if layout.separate is not None:  # gate [E, I, H] or [E * I, H]
        num_experts = layout.stacked or gate_up.shape[0]
        hidden = gate_up.shape[-1]
        intermediate = gate_up.numel() // num_experts // hidden
    else:
        num_experts = gate_up.shape[0]
        hidden = gate_up.shape[1] if layout.transposed else gate_up.shape[2]
        intermediate = fused.get_parameter(keys[1]).shape[1 if layout.transposed else 2]
    experts = [Expert(names, hidden, intermediate, layout.bias, gate_up.dtype, "meta") for _ in range(num_experts)]
    owner = _gate_owner(fused, layout)
    act_fn = activation_of(fused)
    gate_fn = None
    if layout.gated:
        apply_gate = getattr(type(fused), "_apply_gate", None)
        gate_fn = (functools.partial(apply_gate, owner) if apply_gate is not None
                   else lambda gate_up: act_fn(gate_up.chunk(2, dim=-1)[0]) * gate_up.chunk(2, dim=-1)[1])
    # transformers' flag, or a norm the family's own forward applies after the flagged projections (Ergo)
    post_norm = fused._modules.get("post_expert_norm")
    every_token = FLAGLESS_EXPERTS.get(type(fused).__name__, (None, None, False))[2]
    routed = (SharedExperts if every_token else RoutedExperts)(experts, layout, gate_fn, act_fn, post_norm, type(fused),
                                                                owner, scaled_inputs)
    if gate_up.device.type != "meta":
        fused_tensors = {k: v.detach() for k, v in fused.named_parameters() if v is not None}
        missing, _ = routed.load_state_dict(split_fused(fused_tensors, layout, names), strict=False, assign=True)
        if any(key.split(".")[0].isdigit() for key in missing):  # the norm after the experts keeps its own weights
            raise QuantkitError(f"unfusing {type(fused).__name__} left {missing[0]} unset; this is a bug")
    return routed


def unfuse_experts(root: nn.Module, names: ExpertNames | None = None) -> list[str]:
    """Replace every fused experts module under `root` (a model or a decoder layer) by RoutedExperts
    (Llama 4's MoE block by RoutedLlama4Moe), in place; return the replaced modules' names.

    `names` are the projection names (default: expert_names of the model's config). The weights move into the
    per-expert linears (meta tensors stay on meta: a streamed layer is filled later from the checkpoint).
    """
    if names is None:
        config = getattr(root, "config", None)
        names = expert_names(config) if config is not None else ExpertNames()
    replaced = []
    for name, module in list(root.named_modules()):
        if type(module).__name__ == "Llama4TextMoe" and is_llama4_experts(module.experts):
            experts = _routed_experts(module.experts, fused_layout(module.experts), names, scaled_inputs=True)
            _set_child(root, name, RoutedLlama4Moe(module, experts))
            replaced.append(f"{name}.experts" if name else "experts")
            continue
        layout = fused_layout(module)
        if layout is None or is_llama4_experts(module) or not name:
            continue
        _set_child(root, name, _routed_experts(module, layout, names, scaled_inputs=False))
        replaced.append(name)
    return replaced


def fuse_experts(root: nn.Module) -> list[str]:
    """Put transformers' fused experts modules back where unfuse_experts replaced them (their dequantized or FP
    weights joined into the 3-D parameters); return their names."""
    fused_names = []
    for name, module in list(root.named_modules()):
        if isinstance(module, RoutedLlama4Moe):
            block = module.fused_block_class.__new__(module.fused_block_class)
            nn.Module.__init__(block)
            block.top_k, block.hidden_dim, block.num_experts = module.top_k, module.hidden_dim, module.num_experts
            block.experts = _fused_module(module.experts)
            block.router, block.shared_expert = module.router, module.shared_expert
            _set_child(root, name, block)
            fused_names.append(f"{name}.experts")
        elif isinstance(module, RoutedExperts) and not any(name.startswith(n + ".") or name == n for n in fused_names):
            _set_child(root, name, _fused_module(module))
            fused_names.append(name)
    return fused_names


def _fused_module(routed: RoutedExperts) -> nn.Module:
    """transformers' fused module again: its class, its attributes and submodules, the joined weights."""
    fused = routed.fused_class.__new__(routed.fused_class)
    nn.Module.__init__(fused)
    for key, value in vars(routed.fused_attrs).items():
        # submodules (act_fn, a post-expert norm, a fresh copy of DBRX's weight holder) register as modules again
        setattr(fused, key, _without_fused(value, key, routed.layout) if isinstance(value, nn.Module) else value)
    first = next(routed.experts())
    tensors = {f"{e}.{k}": v for e, expert in enumerate(routed.experts()) for k, v in expert.state_dict().items()}
    for key, value in join_experts(tensors, routed.layout, first.names, routed.num_experts).items():
        owner, _, leaf = key.rpartition(".")
        (fused.get_submodule(owner) if owner else fused)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return fused


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


# ---------------------------------------------------------------- what the engine asks


def routed_experts(root: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """(name, module) of every RoutedExperts under `root`."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, RoutedExperts)]


def set_all_tokens(root: nn.Module, on: bool) -> None:
    """Run every expert under `root` on every token (statistics) or on its routed tokens only (inference)."""
    for _, experts in routed_experts(root):
        experts.all_tokens = on


def expert_solve_groups(layer: nn.Module) -> list[list[str]]:
    """A layer's expert linears (names relative to the layer) in two solve groups: every expert's gate and up
    (they read the layer's normed hidden state), then every expert's down (it reads its gate and up)."""
    first: list[str] = []
    second: list[str] = []
    for name, experts in routed_experts(layer):
        for e, expert in enumerate(experts.experts()):
            names = expert.names
            first += [f"{name}.{e}.{n}" for n in (names.gate, names.up) if n is not None]
            second.append(f"{name}.{e}.{names.down}")
    return [g for g in (first, second) if g]


def with_expert_groups(groups: list[list[str]], layer: nn.Module, block: str, position: int) -> list[list[str]]:
    """A layer's solve groups (names relative to the layer) with the RoutedExperts under `block` added where the
    block runs (after the first `position` groups): every expert's gate and up join the group of the block's
    own first linears (a shared expert's gate and up, reading the same hidden state) or form a new one, every
    down the group after it."""
    under = [(n, m) for n, m in routed_experts(layer.get_submodule(block) if block else layer)]
    first, second = [], []
    for name, experts in under:
        path = f"{block}.{name}" if block else name
        for e, expert in enumerate(experts.experts()):
            names = expert.names
            first += [f"{path}.{e}.{n}" for n in (names.gate, names.up) if n is not None]
            second.append(f"{path}.{e}.{names.down}")
    out = [list(g) for g in groups]

    def in_block(group: list[str]) -> bool:
        return all(n.startswith(block + ".") for n in group) if block else False

    for offset, names in enumerate((first, second)):
        at = position + offset
        if at < len(out) and in_block(out[at]):
            out[at] = out[at] + names
        else:
            out.insert(at, names)
    return out


def expert_of(name: str) -> tuple[str, int] | None:
    """(container, expert index) for an expert linear's name (`...experts.<e>.<projection>`), else None."""
    parts = name.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].isdigit() and parts[i - 1].endswith("experts"):
            return ".".join(parts[:i]), int(parts[i])
    return None


# ---------------------------------------------------------------- checkpoint names


def _renamings(model: nn.Module) -> list:
    """transformers' key renamings for `model` (checkpoint -> model), without its fused-weight converters."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model, add_legacy=False) if type(t) is WeightRenaming]


def checkpoint_key(model: nn.Module) -> Callable[[str], str]:
    """model key -> the key the family's checkpoints use, for a model whose experts are unfused (transformers'
    renamings reversed: Mixtral's `mlp` is `block_sparse_moe` on disk); the identity for any other model."""
    if not routed_experts(model):
        return lambda key: key
    from transformers.core_model_loading import apply_renamings

    reverse = [t.reverse_transform() for t in reversed(_renamings(model))]
    return functools.partial(_rename, apply_renamings, reverse)


def model_key(model: nn.Module) -> Callable[[str], str]:
    """checkpoint key -> `model`'s key for a model whose experts are unfused (checkpoint_key's inverse)."""
    if not routed_experts(model):
        return lambda key: key
    from transformers.core_model_loading import apply_renamings

    rename, names = functools.partial(_rename, apply_renamings, _renamings(model)), set(model.state_dict())
    # as transformers loads: a renaming that misses while the key is the model's keeps it (DeepSeek-V4's model.norm)
    return lambda key: key if rename(key) not in names and key in names else rename(key)


def _rename(apply: Callable, renamings: list, key: str) -> str:
    return apply(key, renamings) if renamings else key


def unfused_state(root: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (keys relative to `root`) with any fused experts weights (a checkpoint that keeps them fused:
    gpt-oss, Llama 4) split into the per-expert keys of `root`'s RoutedExperts."""
    out = dict(tensors)
    for name, experts in routed_experts(root):
        keys = [f"{name}.{k}" for k in experts.layout.fused_names()]
        if not all(k in out for k in keys):
            continue
        fused = {k[len(name) + 1:]: out.pop(k) for k in [*keys, *(f"{k}_bias" for k in keys)] if k in out}
        first = next(experts.experts())
        out.update({f"{name}.{k}": v for k, v in split_fused(fused, experts.layout, first.names).items()})
    return out


def checkpoint_module(model: nn.Module) -> Callable[[str], str]:
    """model module name -> the checkpoint's name for it (checkpoint_key for module names)."""
    rename = checkpoint_key(model)
    return lambda name: rename(f"{name}.weight").removesuffix(".weight")
