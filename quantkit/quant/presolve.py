"""A pre-solve step: work done on each decoder layer before its linears are solved (smoothing today; AWQ's scale
search would be one), carried by the run's Method (Method.with_presolve) with its own options.

This is the interface; the steps live where the layer work is (quantkit/engine/smoothing.py) and are registered by
name in quantkit/engine/presolve.py. The engine calls `apply` on every decoder layer, after the layer's token
weights are known and before the FP stream's pass, so an FP target is read in the transformed basis.
"""

from __future__ import annotations

from typing import Any


class PreSolve:
    """No pre-solve work (the base of every step): subclasses set `name`, their options as fields, and apply."""

    name: str = "none"
    token_weights: bool = False  # the step weighs tokens by TLQ's importance (the run then computes them)

    def check(self, method: Any) -> None:
        """Raise QuantkitError if the step cannot go with `method` (a quantkit.quant.methods.Method)."""

    def apply(self, layer: Any, adapter: Any, inputs: Any, spec: Any, weights: Any, *, comm: Any,
              sample_ids: Any) -> dict | None:
        """Transform decoder `layer` in place before its solves (its FP output unchanged up to rounding), from this
        rank's `inputs` (quantkit.engine.capture.LayerInputs, whose samples are `sample_ids` of the whole set) and
        their token `weights` (LayerWeights or None), the same on every rank (`comm`); return its report entry."""
        return None

    def to_dict(self) -> dict:
        """The step and its options, for reports and resume fingerprints."""
        return {"name": self.name}

    def __str__(self) -> str:
        return self.name


NO_PRESOLVE = PreSolve()
