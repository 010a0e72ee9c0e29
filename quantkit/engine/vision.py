"""The vision side of a VLM (tower and projector), quantized when asked: group by group in call order.

The vision linears are found by running one sample: every nn.Linear under the adapter's vision
modules that runs before the language model, in the order it first runs; consecutive ones that
read the same tensor (q/k/v, gate/up) form a group and share one Hessian. Linears never called as
modules (the out_proj of SigLIP's pooling attention, which reads its weights directly) stay in full
precision; the pooling head's MLP does run, so it is quantized on its real inputs. Each group's Hessian
comes from full vision passes over the calibration images with every earlier group already
quantized, so the tower is calibrated quantization-exposed like the decoder layers; the passes stop
at the first decoder layer. Every image patch counts once: token importance covers the decoder
layers only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantkit.engine.capture import move_outside_layers, run_until_first_layer
from quantkit.engine.checks import check_group_width
from quantkit.engine.comm import Comm
from quantkit.engine.hessian import HessianAccumulator
from quantkit.engine.plan import LinearPlan
from quantkit.engine.solve import install_result, reduce_accumulator, solve_rows
from quantkit.errors import QuantkitError
from quantkit.models import get_module
from quantkit.models.base import Adapter
from quantkit.quant.methods import Method, method_for
from quantkit.quant.spec import QuantResult, QuantSpec


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@torch.no_grad()
def vision_groups(model: nn.Module, adapter: Adapter, sample: dict, device: torch.device | str = "cpu") -> list[list[str]]:
    """The vision-side linears that run on `sample`, in call order, grouped where consecutive ones read one tensor."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs are held, so their identities stay unique
    handles = [
        module.register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, args[0])))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _under(name, adapter.vision)
    ]
    try:
        run_until_first_layer(model, adapter, [sample], device)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[list[str], torch.Tensor]] = []
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and groups[-1][1] is x:
            groups[-1][0].append(name)
        else:
            groups.append(([name], x))
    return [names for names, _ in groups]


def check_vision(model: nn.Module, groups: list[list[str]], spec: QuantSpec, plan: LinearPlan | None = None) -> None:
    """Raise QuantkitError, before any work, if a vision linear cannot be quantized (`plan`: each one's settings)."""
    if not groups:
        raise QuantkitError("no vision linears ran on the first calibration sample; give image-text calibration data")
    plan = plan or LinearPlan(spec, "rtn")
    for name in (n for group in groups for n in group):
        if plan.settings(name) is not None:
            check_group_width(get_module(model, name).in_features, name, plan.spec_for(name),
                              ", or leave the vision side in full precision")


@torch.no_grad()
def quantize_vision(
    model: nn.Module,
    adapter: Adapter,
    samples: Sequence[dict],
    groups: list[list[str]],
    spec: QuantSpec,
    method: Method | str,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
    plan: LinearPlan | None = None,
) -> tuple[dict[str, QuantResult], dict]:
    """Quantize the vision `groups` in place, in order, on this rank's `samples`; return results and report.

    With several ranks the Hessians are all-reduced and every rank solves every group, so all end
    with the same tower. `plan` gives each linear its settings (a recipe's): linears it leaves in FP
    stay as they are, the others are solved with their own method and spec.
    """
    comm = comm or Comm()
    method = method_for(method)
    plan = plan or LinearPlan(spec, method)
    move_outside_layers(model, adapter, device)
    results: dict[str, QuantResult] = {}
    reports: dict[str, dict] = {}
    for group in groups:
        settings = {name: plan.settings(name) for name in group}
        linears = {name: get_module(model, name) for name in group if settings[name] is not None}
        if not linears:
            continue
        hessian = None
        if method.needs_activations and any(s.method.needs_activations for s in settings.values() if s is not None):
            first = get_module(model, group[0])  # every linear of the group reads its input
            acc = HessianAccumulator(first.in_features, device)
            handle = first.register_forward_pre_hook(lambda mod, args, acc=acc: acc.add(args[0]))
            try:
                run_until_first_layer(model, adapter, samples, device)
            finally:
                handle.remove()
            reduce_accumulator(acc, comm)
            hessian, _ = acc.take_results()
        alike: dict = {}
        for name in linears:
            alike.setdefault(settings[name], []).append(name)
        for chosen, names in alike.items():
            used = hessian if chosen.method.needs_activations else None
            weights = [linears[name].weight.data.float() for name in names]
            for name, weight, result in zip(names, weights, solve_rows(chosen.method.solve, weights, used, chosen.spec, names)):
                reports[name] = install_result(linears[name], weight, result, used) | chosen.describe()
                results[name] = result
    return results, {"groups": len(groups), "linears": reports}
