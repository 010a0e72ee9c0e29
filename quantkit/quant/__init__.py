"""Weight solvers: each maps (weight, Hessian, QuantSpec) to a QuantResult, knowing nothing of models."""

from __future__ import annotations

from quantkit.quant.gptq import gptq_solve
from quantkit.quant.methods import METHODS, Method, Solver, method_for
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantResult, QuantSpec

__all__ = [
    "METHODS",
    "Method",
    "QuantResult",
    "QuantSpec",
    "Solver",
    "gptq_solve",
    "method_for",
    "rtn_solve",
]
