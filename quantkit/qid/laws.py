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
        return math.exp(log_d) if log_d < 709 else math.inf  # past float range: unbounded, not an OverflowError

    def to_dict(self) -> dict:
        """Plain values of the four parameters."""
        return {"k": self.k, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}


# Ouyang et al. 2024, "Low-Bit Quantization Favors Undertrained LLMs" (arXiv 2411.17691),
# fitted on GPTQ-quantized Pythia checkpoints.
PUBLISHED_LAWS: dict[str, UnifiedLaw] = {
    "ouyang2024-gptq": UnifiedLaw(k=0.017, alpha=0.2261, beta=0.5251, gamma=5.4967, name="ouyang2024-gptq"),
}


# Where N, D, P and QiD describe a language model at all: a value outside is a typo or a unit slip (the law,
# a power law, happily answers 1e150 nats for D = 1e300), so the CLI refuses it instead of printing that.
PLAUSIBLE = {
    "params": (1.0, 1e15, "non-embedding parameters N"),
    "tokens": (1.0, 1e17, "training tokens D"),
    "bits": (1.0, 16.0, "weight bits P"),
    "qid": (0.0, 20.0, "QiD in nats"),  # more than the loss of uniform guessing over any vocabulary
}


def check_plausible(name: str, value: float, flag: str | None = None) -> float:
    """`value` if it lies in PLAUSIBLE[name]'s range (QiD above 0), else a QuantkitError naming `flag` and the range."""
    low, high, what = PLAUSIBLE[name]
    flag = flag or f"--{name}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise QuantkitError(f"{flag} must be a finite number ({what}), got {value!r}")
    if name == "qid" and value <= 0:
        raise QuantkitError(f"{flag} {value:g} is not positive: the law's logarithm has no value there")
    if not low <= value <= high:
        raise QuantkitError(f"{flag} {value:g} is outside the range of {what} ({low:g} to {high:g}); check its units")
    return float(value)


def _check_positive(**values: float) -> None:
    """Raise QuantkitError unless every named value is a finite positive number."""
    for name, value in values.items():
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise QuantkitError(f"{name} must be a positive finite number, got {value!r}")


# The method each published law was fitted on: another method's QiD read through it would be a wrong answer.
PUBLISHED_METHODS = {"ouyang2024-gptq": "gptq"}


def _published(spec: str | os.PathLike, method: str | None) -> UnifiedLaw | None:
    """The published law named `spec` (None when it names none), refusing a --method it was not fitted on."""
    law = PUBLISHED_LAWS.get(str(spec))
    if law is not None and method is not None and method != PUBLISHED_METHODS[law.name]:
        raise QuantkitError(f"the published law {law.name} was fitted on {PUBLISHED_METHODS[law.name]} QiD, not "
                            f"--method {method}; drop --method or give a `qid fit -o` JSON with a {method} fit")
    return law


def load_law(spec: str | os.PathLike, method: str | None = None, bits: int | None = None) -> UnifiedLaw:
    """A published law by name, or the unified law from a `qid fit` JSON (choose --method if several)."""
    published = _published(spec, method)
    if published is not None:
        return published
    path, doc = _read_law_file(spec, "fit")
    return law_from_fit(doc, method=method, bits=bits, source=str(path))


def _read_law_file(spec: str | os.PathLike, kind: str) -> tuple[Path, object]:
    """(path, parsed JSON) of a law or fit file `spec` that is not a published law's name."""
    path = Path(spec)
    if not path.is_file():
        raise QuantkitError(
            f"unknown law {str(spec)!r}: give one of {', '.join(PUBLISHED_LAWS)} or the path of a `qid fit -o` JSON file"
        )
    return path, read_fit_json(path, kind)


def read_fit_json(path: str | os.PathLike, kind: str = "fit") -> object:
    """The parsed JSON of a `qid fit -o` file, or a QuantkitError naming it (`kind`: what the caller calls it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise QuantkitError(f"cannot read {kind} file {path}: {err}; give the JSON written by `qid fit -o`") from err


def chosen_fit(doc: dict, method: str | None = None, bits: int | None = None, source: str = "fit") -> dict:
    """The unified-law fit of one method (pooled over bits, or at `bits` for --by-bits fits) in a fit result."""
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
        return pooled[0]
    matching = [f for f in fits if bits is not None and f.get("bits") == bits]
    if not matching:
        have = sorted(f.get("bits") for f in fits)
        raise QuantkitError(f"{source} holds per-bit-width fits for bits {have}; predict at one of those bit widths")
    return matching[0]


def _coefficient(params: dict, name: str) -> float | None:
    """A coefficient given as a finite number or as {"value": number}; None when absent or not such a number."""
    entry = params.get(name)
    value = entry.get("value") if isinstance(entry, dict) else entry
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _unified(params: dict, source: str, name: str, folded: bool = False) -> UnifiedLaw:
    """The law of a coefficient mapping, every coefficient a finite number, or one line naming each one that is not.
    gamma may be absent only where `folded`: a --by-bits fit folds the bits into k, so it has no gamma to give;
    anywhere else a missing gamma read as 0 would predict a QiD that ignores the bit width."""
    values = {n: _coefficient(params, n) for n in ("k", "alpha", "beta", "gamma")}
    if folded and params.get("gamma") is None:
        values["gamma"] = 0.0
    missing = [repr(n) for n, v in values.items() if v is None]
    if missing:
        raise QuantkitError(f"{source} lacks a numeric {' and '.join(missing)} for the law k * D^beta / (N^alpha P^gamma); "
                            "give a `qid fit -o` JSON or {\"k\", \"alpha\", \"beta\", \"gamma\"}")
    return UnifiedLaw(**values, name=name)


def law_from_fit(doc: dict, method: str | None = None, bits: int | None = None, source: str = "fit") -> UnifiedLaw:
    """The unified law of one method (pooled over bits, or at `bits` for --by-bits fits) from a fit result."""
    chosen = chosen_fit(doc, method=method, bits=bits, source=source)
    p = chosen.get("params")
    if not isinstance(p, dict):
        raise QuantkitError(f"{source}: the unified fit has no params; run `quantkit qid fit CSV -o FIT.json` again")
    return _unified(p, source, f"{Path(source).name}:{chosen.get('method')}", folded=chosen.get("bits") is not None)


def law_and_draws(spec: str | os.PathLike, method: str | None = None, bits: int | None = None) -> tuple[UnifiedLaw, list[UnifiedLaw], dict]:
    """(law, its bootstrap draws as laws (may be empty), the chosen fit's entry) from a name, a fit JSON or a law JSON.

    A law JSON is {"k", "alpha", "beta", "gamma"} (numbers), optionally with "draws": {"log_k": [...],
    "alpha": [...], "beta": [...], "gamma": [...]} as `qid fit -o` writes for each unified fit.
    """
    published = _published(spec, method)
    if published is not None:
        return published, [], {}
    path, doc = _read_law_file(spec, "law")
    if isinstance(doc, dict) and "fits" in doc:
        chosen = chosen_fit(doc, method=method, bits=bits, source=str(path))
        law = law_from_fit(doc, method=method, bits=bits, source=str(path))
    elif isinstance(doc, dict):
        chosen = doc
        law = _unified(doc, str(path), path.name)
    else:
        raise QuantkitError(f"{path} is not a JSON object; give a `qid fit -o` JSON or {{\"k\", \"alpha\", \"beta\", \"gamma\"}}")
    draws = chosen.get("draws") or {}
    if not isinstance(draws, dict):
        raise QuantkitError(f"{path}: 'draws' must map log_k/alpha/beta/gamma to lists of numbers")
    columns = [draws.get(n) for n in ("log_k", "alpha", "beta")]
    if any(c is None for c in columns):
        return law, [], chosen
    folded = "fits" in doc and chosen.get("bits") is not None  # a --by-bits fit: no gamma, its draws neither
    for name in ("log_k", "alpha", "beta", "gamma"):
        column = draws.get(name)
        if (column is not None or name != "gamma" or not folded) and not (isinstance(column, list) and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in column)):
            raise QuantkitError(f"{path}: the draws' {name!r} is {json.dumps(column)[:40]}, not a list of finite numbers "
                                "(as `qid fit -o` writes); write the file again with `qid fit -o`")
    gammas = draws.get("gamma") or [law.gamma] * len(columns[0])
    if len({len(c) for c in columns} | {len(gammas)}) != 1:
        raise QuantkitError(f"{path}: the draws of log_k, alpha, beta and gamma differ in length; write the file again with `qid fit -o`")
    laws = [UnifiedLaw(k=math.exp(lk), alpha=a, beta=b, gamma=g) for lk, a, b, g in zip(*columns, gammas)]
    return law, laws, chosen


def check_fitted_bits(chosen: dict, bits: float, source: str) -> None:
    """`bits` lies within the widths a fit's rows were measured at (its residuals name them): a law's P exponent is
    fitted over those widths only, and a QiD at another one (8 bits from a 2-4-bit fit) is no measurement's."""
    fitted = sorted({r["bits"] for r in chosen.get("residuals") or () if isinstance(r, dict)
                     and isinstance(r.get("bits"), (int, float)) and not isinstance(r.get("bits"), bool)})
    if fitted and not fitted[0] <= bits <= fitted[-1]:
        raise QuantkitError(f"--bits {bits:g} is outside the widths the law in {source} was fitted on "
                            f"({', '.join(f'{b:g}' for b in fitted)}); it says nothing about widths its rows never "
                            f"measured: ask at {fitted[0]:g} to {fitted[-1]:g} bits, or fit rows measured at {bits:g} bits")
