"""The engine's report as a console table: one line per decoder layer, then the run's totals."""

from __future__ import annotations

from statistics import mean


def _errors(entries, key: str) -> list[float]:
    return [float(entry[key]) for entry in entries if isinstance(entry, dict) and key in entry]


def layer_table(report: dict) -> list[str]:
    """Lines of a per-layer table: its quantized linears, their mean relative output error with plain rounding
    on the solver's grid and after the solve (where the method read activations), the mean relative weight
    error, and the layer's seconds."""
    lines = [f"{'layer':>5}  {'linears':>7}  {'output error: rounding -> solved':>33}  {'weight error':>12}  {'time':>7}"]
    for layer in report.get("layers") or []:
        linears = layer.get("linears") or {}
        entries = list(linears.values())
        rounded, solved = _errors(entries, "rtn_output_rel_err"), _errors(entries, "output_rel_err")
        weight = _errors(entries, "weight_rel_mse")
        output = f"{mean(rounded):.5f} -> {mean(solved):.5f}" if rounded and solved else "-"
        lines.append(f"{layer.get('layer', '?'):>5}  {len(linears):>7}  {output:>33}  "
                     f"{(f'{mean(weight):.5f}' if weight else '-'):>12}  {float(layer.get('seconds', 0)):>6.2f}s")
    return lines


def error_summary(report: dict) -> str | None:
    """"mean output error 0.0092 with plain rounding -> 0.0022 (N linears)", or None without output errors."""
    every = [entry for layer in report.get("layers") or [] for entry in (layer.get("linears") or {}).values()]
    rounded, solved = _errors(every, "rtn_output_rel_err"), _errors(every, "output_rel_err")
    if not rounded or not solved:
        return None
    return f"mean relative output error {mean(rounded):.5f} with plain rounding -> {mean(solved):.5f} solved ({len(solved)} linears)"
