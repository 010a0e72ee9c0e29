"""QiD scaling laws: the unified law QiD = k * D^beta / (N^alpha * P^gamma), evaluation and inverse.

N is the number of non-embedding parameters, D the number of training tokens, P the weight bit
width and QiD = loss(quantized) - loss(16-bit) in nats per token on held-out text.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

PYTHIA_TOKENS_PER_STEP = 2_097_152  # Pythia: batch 1024 sequences x 2048 tokens


@dataclass(frozen=True)
class UnifiedLaw:
    """QiD(N, D, P) = k * D^beta / (N^alpha * P^gamma)."""

    k: float
    alpha: float
    beta: float
    gamma: float
    name: str = "custom"

    def qid(self, n_params: float, tokens: float, bits: float) -> float:
        """Predicted QiD (nats) for N non-embedding params, D training tokens and P bits."""
        _check_positive(n_params=n_params, tokens=tokens, bits=bits)
        return self.k * tokens**self.beta / (n_params**self.alpha * bits**self.gamma)

    def tokens_for_qid(self, n_params: float, qid: float, bits: float) -> float:
        """Training tokens D at which a model of N params reaches `qid` at P bits (inverse in D)."""
        _check_positive(n_params=n_params, qid=qid, bits=bits)
        if self.beta == 0:
            raise QuantkitError("this law has beta = 0: QiD does not depend on D, so it cannot be inverted for tokens")
        log_d = (math.log(qid) + self.alpha * math.log(n_params) + self.gamma * math.log(bits) - math.log(self.k)) / self.beta
        return math.exp(log_d)

    def to_dict(self) -> dict:
        """Plain values of the four parameters."""
        return {"k": self.k, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}


# Ouyang et al. 2024, "Low-Bit Quantization Favors Undertrained LLMs" (arXiv 2411.17691),
# fitted on GPTQ-quantized Pythia checkpoints.
PUBLISHED_LAWS: dict[str, UnifiedLaw] = {
    "ouyang2024-gptq": UnifiedLaw(k=0.017, alpha=0.2261, beta=0.5251, gamma=5.4967, name="ouyang2024-gptq"),
}


def _check_positive(**values: float) -> None:
    """Raise QuantkitError unless every named value is a finite positive number."""
    for name, value in values.items():
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise QuantkitError(f"{name} must be a positive finite number, got {value!r}")


def load_law(spec: str | os.PathLike, method: str | None = None, bits: int | None = None) -> UnifiedLaw:
    """A published law by name, or the unified law from a `qid fit` JSON (choose --method if several)."""
    if str(spec) in PUBLISHED_LAWS:
        return PUBLISHED_LAWS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise QuantkitError(
            f"unknown law {str(spec)!r}: give one of {', '.join(PUBLISHED_LAWS)} or the path of a `qid fit -o` JSON file"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise QuantkitError(f"cannot read fit file {path}: {err}; give the JSON written by `qid fit -o`") from err
    return law_from_fit(doc, method=method, bits=bits, source=str(path))


def law_from_fit(doc: dict, method: str | None = None, bits: int | None = None, source: str = "fit") -> UnifiedLaw:
    """The unified law of one method (pooled over bits, or at `bits` for --by-bits fits) from a fit result."""
    fits = [f for f in doc.get("fits", []) if isinstance(f, dict) and f.get("law") == "unified"] if isinstance(doc, dict) else []
    if not fits:
        raise QuantkitError(f"{source} holds no unified-law fit; run `quantkit qid fit CSV -o FIT.json` first")
    if method is not None:
        fits = [f for f in fits if f.get("method") == method]
        if not fits:
            raise QuantkitError(f"{source} has no unified fit for method {method!r}; pass one of its methods")
    methods = sorted({str(f.get("method")) for f in fits})
    if len(methods) > 1:
        raise QuantkitError(f"{source} holds fits for several methods ({', '.join(methods)}); choose one with --method")
    pooled = [f for f in fits if f.get("bits") is None]
    if pooled:
        chosen = pooled[0]
    else:
        matching = [f for f in fits if bits is not None and f.get("bits") == bits]
        if not matching:
            have = sorted(f.get("bits") for f in fits)
            raise QuantkitError(f"{source} holds per-bit-width fits for bits {have}; predict at one of those bit widths")
        chosen = matching[0]
    p = chosen["params"]
    gamma = p["gamma"]["value"] if "gamma" in p else 0.0
    return UnifiedLaw(
        k=float(p["k"]["value"]), alpha=float(p["alpha"]["value"]), beta=float(p["beta"]["value"]),
        gamma=float(gamma), name=f"{Path(source).name}:{chosen.get('method')}",
    )
