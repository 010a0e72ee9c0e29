"""Figures of measured QiD and fitted unified laws: QiD vs D per N, vs N per D, vs P per N (PNG + SVG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError
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


def plot_table(table: QidTable, out_dir: str | os.PathLike, fit: dict | None = None, method: str | None = None,
               formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write qid_vs_{D,N,P}_{method}.{png,svg} for each method (or one); return the written paths."""
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise QuantkitError(f"unsupported figure format(s) {bad or formats}; choose from png, svg, pdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    methods = sorted({r["method"] for r in table.rows})
    if method is not None:
        if method not in methods:
            raise QuantkitError(f"no rows for method {method!r}; the table has: {', '.join(methods) or 'none'}")
        methods = [method]
    if not methods:
        raise QuantkitError("the table holds no successful measurements to plot")
    cmap = plt.get_cmap("viridis")

    def color(i: int, n: int) -> tuple:
        """The i-th of n colours along viridis."""
        return cmap(0.1 + 0.8 * i / max(n - 1, 1))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for m in methods:
        rows = [r for r in table.rows if r["method"] == m]
        pos = [r for r in rows if r["qid"] > 0]
        note = f" ({len(rows) - len(pos)} point(s) with QiD <= 0 not shown)" if len(pos) < len(rows) else ""
        bits_all = sorted({r["bits"] for r in pos})
        ns = sorted({r["N"] for r in pos})
        ds = sorted({r["D"] for r in pos})
        figures = {}
        # QiD vs D, one panel per bit width, one series per N.
        fig, axes = plt.subplots(1, max(len(bits_all), 1), figsize=(4.2 * max(len(bits_all), 1), 3.6), squeeze=False, sharey=True)
        for ax, b in zip(axes[0], bits_all):
            law = _law(fit, m, b)
            for i, n in enumerate(ns):
                pts = sorted((r["D"], r["qid"]) for r in pos if r["bits"] == b and r["N"] == n)
                if not pts:
                    continue
                ax.plot(*zip(*pts), "o", color=color(i, len(ns)), label=f"N={n:.3g}")
                if law is not None:
                    x = _grid([p[0] for p in pts])
                    ax.plot(x, [law.qid(n, d, b) for d in x], "--", color=color(i, len(ns)))
            ax.set(xscale="log", yscale="log", xlabel="training tokens D", title=f"{b} bits")
        axes[0][0].set_ylabel("QiD (nats)")
        axes[0][0].legend(fontsize=7)
        figures["D"] = fig
        # QiD vs N, one panel per bit width, one series per D.
        fig, axes = plt.subplots(1, max(len(bits_all), 1), figsize=(4.2 * max(len(bits_all), 1), 3.6), squeeze=False, sharey=True)
        for ax, b in zip(axes[0], bits_all):
            law = _law(fit, m, b)
            for i, d in enumerate(ds):
                pts = sorted((r["N"], r["qid"]) for r in pos if r["bits"] == b and r["D"] == d)
                if not pts:
                    continue
                ax.plot(*zip(*pts), "s", color=color(i, len(ds)), label=f"D={d:.3g}")
                if law is not None and len(pts) > 1:
                    x = _grid([p[0] for p in pts])
                    ax.plot(x, [law.qid(n, d, b) for n in x], "--", color=color(i, len(ds)))
            ax.set(xscale="log", yscale="log", xlabel="non-embedding params N", title=f"{b} bits")
        axes[0][0].set_ylabel("QiD (nats)")
        axes[0][0].legend(fontsize=7)
        figures["N"] = fig
        # QiD vs P, one panel per N, one series per D.
        fig, axes = plt.subplots(1, max(len(ns), 1), figsize=(4.2 * max(len(ns), 1), 3.6), squeeze=False, sharey=True)
        for ax, n in zip(axes[0], ns):
            for i, d in enumerate(ds):
                pts = sorted((r["bits"], r["qid"]) for r in pos if r["N"] == n and r["D"] == d)
                if not pts:
                    continue
                ax.plot(*zip(*pts), "^", color=color(i, len(ds)), label=f"D={d:.3g}")
                law = _law(fit, m, None)
                if law is not None and len(pts) > 1:
                    x = np.linspace(min(p[0] for p in pts), max(p[0] for p in pts), 30)
                    ax.plot(x, [law.qid(n, d, b) for b in x], "--", color=color(i, len(ds)))
            ax.set(yscale="log", xlabel="bits P", title=f"N={n:.3g}")
        axes[0][0].set_ylabel("QiD (nats)")
        axes[0][0].legend(fontsize=7)
        figures["P"] = fig
        for factor, fig in figures.items():
            for ax in fig.axes:  # minor log-tick labels (mathtext) dominate drawing time; leave them out
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            fig.suptitle(f"QiD vs {factor}, {m}{' (dashed: fitted unified law)' if fit else ''}{note}", fontsize=9)
            fig.tight_layout()
            for ext in formats:
                path = out / f"qid_vs_{factor}_{m}.{ext}"
                with matplotlib.rc_context({"svg.fonttype": "none"}):
                    fig.savefig(path, dpi=120)
                written.append(path)
            plt.close(fig)
    return written
