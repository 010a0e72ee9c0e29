"""Figures of measured QiD and fitted unified laws: QiD vs D per N, vs N per D, vs P per N (PNG + SVG)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError, stopped_write
from quantkit.fsutil import make_parents, remove_created
from quantkit.qid.laws import UnifiedLaw, law_from_fit
from quantkit.qid.table import QidTable


def _law(fit: dict | None, method: str, bits: int | None) -> UnifiedLaw | None:
    """The fitted unified law for a method (and bit width), or None when the fit has none."""
    if fit is None:
        return None
    try:
        return law_from_fit(fit, method=method, bits=bits)
    except QuantkitError:
        return None


def _grid(values: list[float]) -> np.ndarray:
    """Log-spaced x values spanning the data."""
    lo, hi = min(values), max(values)
    return np.geomspace(lo, hi, 50) if hi > lo else np.array([lo])


# QiD against one factor: (its key, panel key, series key, marker, x label); one panel per value of the panel key,
# one series per value of the series key, the fitted law dashed (per bit width, or over bit widths in the P figure).
FIGURES = {
    "D": ("D", "bits", "N", "o", "training tokens D"),
    "N": ("N", "bits", "D", "s", "non-embedding params N"),
    "P": ("bits", "N", "D", "^", "bits P"),
}


def _figure(plt, pos: list[dict], fit: dict | None, method: str, factor: str, color):
    """One figure of QiD against `factor` (FIGURES) for one method's positive rows."""
    key, panel_key, series_key, marker, xlabel = FIGURES[factor]
    panels = sorted({r[panel_key] for r in pos})
    series = sorted({r[series_key] for r in pos})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], panels):
        law = _law(fit, method, p if panel_key == "bits" else None)
        for i, s in enumerate(series):
            pts = sorted((r[key], r["qid"]) for r in pos if r[panel_key] == p and r[series_key] == s)
            if not pts:
                continue
            ax.plot(*zip(*pts), marker, color=color(i, len(series)), label=f"{series_key}={s:.3g}")
            if law is not None and len(pts) > 1:
                xs = [x for x, _ in pts]
                x = np.linspace(min(xs), max(xs), 30) if key == "bits" else _grid(xs)
                at = [{panel_key: p, series_key: s, key: v} for v in x]
                ax.plot(x, [law.qid(a["N"], a["D"], a["bits"]) for a in at], "--", color=color(i, len(series)))
        ax.set(**({} if key == "bits" else {"xscale": "log"}), yscale="log", xlabel=xlabel,
               title=f"{p} bits" if panel_key == "bits" else f"N={p:.3g}")
    axes[0][0].set_ylabel("QiD (nats)")
    axes[0][0].legend(fontsize=7)
    return fig


def plot_table(table: QidTable, out_dir: str | os.PathLike, fit: dict | None = None, method: str | None = None,
               formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write qid_vs_{D,N,P}_{method}.{png,svg} for each method (or one); return the written paths."""
    formats = tuple(dict.fromkeys(formats))  # a format named twice is drawn once (each figure is renamed in once)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise QuantkitError(f"unsupported figure format(s) {bad or formats}; choose from png, svg, pdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = table.methods(method, "plot")
    if fit is not None:
        fitted = {f.get("method") for f in fit.get("fits", []) if isinstance(f, dict)} if isinstance(fit, dict) else set()
        if not fitted & set(methods):
            raise QuantkitError(f"the fit holds laws for {', '.join(sorted(map(str, fitted))) or 'no method'} and the "
                                f"table's rows are {', '.join(methods)}: no curve to draw; give the fit of this table "
                                "(`qid fit CSV -o FIT.json`) or drop --fit")
    cmap = plt.get_cmap("viridis")

    def color(i: int, n: int) -> tuple:
        """The i-th of n colours along viridis."""
        return cmap(0.1 + 0.8 * i / max(n - 1, 1))

    out = Path(out_dir)
    created = make_parents(out)
    staging = None
    try:
        # drawn into a hidden folder inside out and renamed into place once all are drawn: a disk that fills
        # mid-way leaves no half figure, no figure of a run that failed, and not the folder the run created
        staging = Path(tempfile.mkdtemp(prefix=".qid-plot.tmp-", dir=out))
        names = [name for m in methods for name in _draw(plt, table, fit, m, color, formats, staging, matplotlib)]
        for name in names:
            os.replace(staging / name, out / name)
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        raise stopped_write(err, out, staging or out) or err  # noqa: B904 - one line naming out where a write stopped
    shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names]


def _draw(plt, table: QidTable, fit: dict | None, m: str, color, formats: tuple[str, ...], into: Path,
          matplotlib) -> list[str]:
    """Save method m's figures into `into`; return their file names."""
    from matplotlib.ticker import NullFormatter

    rows = [r for r in table.rows if r["method"] == m]
    pos = [r for r in rows if r["qid"] > 0]
    note = f" ({len(rows) - len(pos)} point(s) with QiD <= 0 not shown)" if len(pos) < len(rows) else ""
    figures = {factor: _figure(plt, pos, fit, m, factor, color) for factor in FIGURES}
    names = []
    for factor, fig in figures.items():
        for ax in fig.axes:  # minor log-tick labels (mathtext) dominate drawing time; leave them out
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        fig.suptitle(f"QiD vs {factor}, {m}{' (dashed: fitted unified law)' if fit else ''}{note}", fontsize=9)
        fig.tight_layout()
        try:
            for ext in formats:
                name = f"qid_vs_{factor}_{m}.{ext}"
                with matplotlib.rc_context({"svg.fonttype": "none"}):
                    fig.savefig(into / name, dpi=120)
                names.append(name)
        finally:
            plt.close(fig)
    return names
