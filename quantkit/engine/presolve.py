"""The pre-solve steps a Method can carry (quantkit.quant.presolve), by name: a new step (AWQ's scale search) is a
PreSolve subclass beside the layer work it does (as Smoothing in smoothing.py) and one line in STEPS."""

from __future__ import annotations

from collections.abc import Callable

from quantkit.engine.smoothing import Smoothing
from quantkit.errors import QuantkitError
from quantkit.quant.presolve import NO_PRESOLVE, PreSolve

STEPS: dict[str, Callable[..., PreSolve]] = {
    "none": lambda: NO_PRESOLVE,
    Smoothing.name: Smoothing,
}


def presolve_for(name: str, **options) -> PreSolve:
    """The pre-solve step registered under `name`, with its `options`; QuantkitError if unknown."""
    if name not in STEPS:
        raise QuantkitError(f"unknown pre-solve step {name!r}; choose one of: {', '.join(STEPS)}")
    try:
        return STEPS[name](**options)
    except TypeError as err:
        raise QuantkitError(f"pre-solve step {name}: {err}") from None


def smoothing_mode(mode: str) -> PreSolve:
    """The step of a --smooth mode (none, uniform, tlq: quantkit.quant.smooth.SMOOTH_MODES)."""
    return presolve_for("none") if mode == "none" else presolve_for(Smoothing.name, weights=mode)
