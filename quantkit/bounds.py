"""The bounds of every number option, in one table: the commands' option type (quantkit.cli_options.bounded) holds
the command line to them as click parses it, and the API's boundary checks (quantkit.calibrate.arguments) read the
same entries, so that `quantkit calibrate --seed` and `quantkit.quantize(seed=...)` refuse the same values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from quantkit.errors import MOST_COUNT, expect_int, expect_number

SUPPORTED_BITS = (2, 3, 4, 8)  # the weight widths the solvers and formats quantize to
MOST_SEED = 2**63 - 1  # numpy's and torch's seeds take it
MOST_THREADS = 4096  # torch threads: more than any machine has cores (torch's own int would overflow past 2**63)
MOST_RESAMPLES = 1_000_000  # bootstrap resamples: a million already takes hours of fits, and adds nothing to 95% bounds
MOST_TRAIN_SECONDS = 7 * 24 * 3600.0  # a week: the demo model's training is a minute by default


@dataclass(frozen=True)
class Bound:
    """An integer (`integer`) or a finite float with least <= x, above < x, x < below and x <= most where given;
    an integer's `allowed` values are taken outside that range too (alone, without `least`: only they are). An
    integer is at most MOST_COUNT where no `most` is given: counts past 2**31 overflow torch's and the samplers'
    integers, or mean hours of work before anything fails."""

    integer: bool
    least: float | None = None
    above: float | None = None
    below: float | None = None
    most: float | None = None
    allowed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.integer and self.most is None:
            object.__setattr__(self, "most", MOST_COUNT)


def count(least: int | None = None, most: int | None = None, allowed: tuple[int, ...] = ()) -> Bound:
    """An integer's bound."""
    return Bound(integer=True, least=least, most=most, allowed=allowed)


def real(least: float | None = None, *, above: float | None = None, below: float | None = None,
         most: float | None = None) -> Bound:
    """A finite float's bound."""
    return Bound(integer=False, least=least, above=above, below=below, most=most)


# By the option's Python name (calibrate's as quantkit.quantize spells them); where commands mean other things by
# one name, the command's name comes first (qid_bits).
BOUNDS: dict[str, Bound] = {
    # calibrate, plan and importance (and quantkit.quantize)
    "bits": count(allowed=SUPPORTED_BITS), "group_size": count(1, allowed=(-1,)), "cd_sweeps": count(0),
    "damp": real(0, below=1), "seed": count(0, MOST_SEED), "nsamples": count(1), "seqlen": count(2),
    "nproc": count(1), "dist_timeout": real(above=0),
    # TLQ's gradient pass (calibrate and importance), and the set's own fractions (importance)
    "row_groups": count(1), "draws": count(1), "lam": real(0, most=1), "power": real(above=0),
    "output_side": count(0), "top_fraction": real(above=0, most=1), "floor_fraction": real(0, most=1),
    # eval
    "stride": count(1), "max_tokens": count(2), "batch_size": count(1), "num_fewshot": count(0), "limit": real(),
    # demo, qid
    "train_seconds": real(above=0, most=MOST_TRAIN_SECONDS), "threads": count(1, MOST_THREADS),
    "eval_tokens": count(2), "eval_seqlen": count(2), "calib_seqlen": count(2), "tokens_per_step": count(1),
    "bootstrap": count(0, MOST_RESAMPLES), "level": real(above=0, below=1), "huber_delta": real(),
    "qid_bits": count(), "params": real(), "predict_bits": real(), "tokens": real(), "qid": real(),
    "qid_se": real(0),
}


def checker(name: str, *, optional: bool = False) -> Callable[..., int | float | None]:
    """BOUNDS[name] as an API check, called as check(argument_name, value, flag=...) (expect_int/expect_number)."""
    b = BOUNDS[name]
    if b.integer:
        return partial(expect_int, least=b.least, allowed=b.allowed, most=b.most, optional=optional)
    return partial(expect_number, least=b.least, above=b.above, below=b.below, most=b.most, optional=optional)
