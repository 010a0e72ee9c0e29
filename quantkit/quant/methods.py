"""Quantization methods as objects, in one registry: what statistics each needs and how it solves.

A method is a solver plus what the engine must gather for it: the calibration activations
(Hessians; RTN reads none), token importance weights (TLQ), whether it fits the FP model's
output by default, and a pre-solve step run on each layer first (quantkit.quant.presolve). A new method (AWQ, a vector quantizer) is one Method here and, if it needs a
new solver, one file beside quantkit/quant/gptq.py. Nothing outside this file compares method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.gptq import gptq_solve
from quantkit.quant.presolve import NO_PRESOLVE, PreSolve
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantResult, QuantSpec

Solver = Callable[[torch.Tensor, "torch.Tensor | None", QuantSpec, str], QuantResult]


# Which calibration tokens make a mixture-of-experts expert's Hessian (quantkit.engine.routed.ExpertRows weighs them).
EXPERT_TOKENS = {
    "routed": "each expert's statistics from the tokens routed to it",
    "all": "every expert's statistics from every calibration token (llm-compressor's default)",
    "mix": "each expert's routed tokens plus every token, the latter weighted to count as many tokens as the "
           "expert's projection has inputs (a prior that keeps a rarely chosen expert's Hessian well conditioned)",
}
DEFAULT_EXPERT_TOKENS = "routed"


@dataclass(frozen=True)
class Method:
    """A quantization method: its solver and the statistics it asks the engine for."""

    name: str
    solve: Solver
    needs_activations: bool  # Hessians from the calibration inputs (False: weights alone)
    token_weights: bool  # weighs tokens by importance (quantkit.importance), else every weight is 1
    fp_target_default: bool  # fits the FP model's output unless told otherwise
    summary: str
    # work on each layer before its solves, with its own options (quantkit.quant.presolve; smoothing, AWQ...)
    presolve: PreSolve = field(default=NO_PRESOLVE, compare=False)
    # mixture of experts: which tokens make each expert's statistics (EXPERT_TOKENS; its output is always its routed tokens')
    expert_tokens: str = field(default=DEFAULT_EXPERT_TOKENS, compare=False)
    # under "mix": the every-token prior's weight in tokens per projection input (1: as many tokens as inputs)
    expert_prior: float = field(default=1.0, compare=False)
    # which of METHOD_OPTIONS its solve reads (an option it does not read is refused, not silently dropped)
    reads: frozenset[str] = frozenset()

    def with_presolve(self, step: PreSolve) -> Method:
        """This method with pre-solve `step` on every layer (PreSolve.check says whether a run should pair them)."""
        return replace(self, presolve=step)

    def with_expert_tokens(self, kind: str, prior: float = 1.0) -> Method:
        """This method gathering each expert's statistics from the tokens EXPERT_TOKENS[kind] names (`prior`: mix's
        every-token prior counted as `prior` x in_features tokens)."""
        if kind not in EXPERT_TOKENS:
            raise QuantkitError(f"expert tokens {kind!r} is not one of {', '.join(EXPERT_TOKENS)}")
        if not 0 < prior < float("inf"):
            raise QuantkitError(f"the expert prior is a weight > 0 in tokens per input, got {prior}")
        return replace(self, expert_tokens=kind, expert_prior=float(prior))

    @property
    def reads_token_weights(self) -> bool:
        """Whether a run of this method needs TLQ's token weights: for its solve, or for its pre-solve step."""
        return self.token_weights or self.presolve.token_weights

    @property
    def reads_samples(self) -> bool:
        """Whether a run of this method needs calibration samples: its solve or its pre-solve step reads
        activations (RTN alone rounds each weight from the weight)."""
        return self.needs_activations or self.presolve.name != "none"

    @property
    def options_read(self) -> frozenset[str]:
        """The METHOD_OPTIONS a run of this method reads: its solve's, and those of its pre-solve step."""
        step = self.presolve
        return (self.reads | ({"expert_tokens"} if step.name != "none" else set())
                | ({"importance"} if step.token_weights else set()))

    def fp_target_on(self, fp_target: bool | None) -> bool:
        """Whether a run carries the FP stream: None means this method's default; never without activations."""
        return (self.fp_target_default if fp_target is None else fp_target) and self.needs_activations

    def __str__(self) -> str:
        return self.name


# The build_job options only some methods read, with what each does (the refusal's reason).
METHOD_OPTIONS = {
    "damp": "dampens the Hessian of a GPTQ solve",
    "cd_sweeps": "refines the codes of a GPTQ solve on its Hessian",
    "expert_tokens": "chooses the tokens of a mixture of experts' statistics",
    "importance": "sets the gradient pass of TLQ's token weights",
}
_GPTQ_READS = frozenset({"damp", "cd_sweeps", "expert_tokens"})

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", rtn_solve, needs_activations=False, token_weights=False, fp_target_default=False,
               summary="round-to-nearest on each group's grid; no calibration data read"),
        Method("gptq", gptq_solve, needs_activations=True, token_weights=False, fp_target_default=False,
               summary="GPTQ: error-compensating rounding from the layer's input Hessian", reads=_GPTQ_READS),
        # TLQ's FP target carried its gains on the reference LM's validation windows (benchmarks/bench_tlq.py)
        Method("tlq", gptq_solve, needs_activations=True, token_weights=True, fp_target_default=True,
               summary="GPTQ on token-importance-weighted Hessians, fitted to the FP output",
               reads=_GPTQ_READS | {"importance"}),
    )
}


# The method a run that names none gets (`quantkit calibrate` and quantkit.quantize alike), chosen on validation text by
# the worst corpus first and the mean second (issue #24; benchmarks/README.md "Round 6" and "Round 7"): TLQ. What its
# gradient pass feeds depends on the calibration data (quantkit.importance.tlq_defaults). Text: uniform token weights
# (the Hessians are GPTQ + FP target's) and each linear's output-side factor E[g g^T] in 128-row blocks (16 until
# session 10's wavefront rounding made wider blocks cheap: benchmarks/README.md "Round 9") as GPTQ's row
# metric: on validation it was the only variant no corpus lost on (worst corpus 0.87x / 1.05x GPTQ + FP target, whole
# text 0.81x / 0.88x, ref-lm / step500 W2), where TLQ's token weights traded one corpus for another. Image-text: the
# token weights (lam 0.1), which separate the answer tokens from the image tokens (answer-NLL gap 0.57x / 0.65x
# GPTQ + FP target's at W2 / W3, benchmarks/README.md "TLQ guidance").
DEFAULT_METHOD = "tlq"
DEFAULT_FP_TARGET = True  # the default method fits the FP model's output unless --no-fp-target


def default_method() -> Method:
    """The Method of a run that names none (DEFAULT_METHOD); its gradient pass's settings follow the data."""
    return METHODS[DEFAULT_METHOD]


def method_for(method: Method | str) -> Method:
    """The Method of a name (case-insensitive), or the Method itself; QuantkitError if unknown."""
    if isinstance(method, Method):
        return method
    key = str(method).lower()
    if key not in METHODS:
        raise QuantkitError(f"unknown quantization method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[key]
