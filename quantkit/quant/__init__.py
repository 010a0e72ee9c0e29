"""Weight solvers: each maps (weight, Hessian, QuantSpec) to a QuantResult, knowing nothing of models."""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.gptq import gptq_solve
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantResult, QuantSpec

Solver = Callable[[torch.Tensor, "torch.Tensor | None", QuantSpec, str], QuantResult]

SOLVERS: dict[str, Solver] = {"rtn": rtn_solve, "gptq": gptq_solve}
# Methods that differ from a solver only in how the engine builds the Hessian.
METHOD_ALIASES = {"tlq": "gptq"}


def solver_for(method: str) -> Solver:
    """The solver function for a quantization method name (rtn, gptq, tlq)."""
    key = method.lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in SOLVERS:
        choices = ", ".join(sorted([*SOLVERS, *METHOD_ALIASES]))
        raise QuantkitError(f"unknown quantization method {method!r}; choose one of: {choices}")
    return SOLVERS[key]


__all__ = [
    "METHOD_ALIASES",
    "SOLVERS",
    "QuantResult",
    "QuantSpec",
    "Solver",
    "gptq_solve",
    "rtn_solve",
    "solver_for",
]
