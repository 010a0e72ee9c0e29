"""Seconds a calibration run takes, from the rates benchmarks/bench_real_size.py measured (CPU, one thread,
float32; figures and commands in benchmarks/README.md, "Real sizes").

Per decoder layer: the forward passes cost `capture` seconds per token and layer parameter (a method's
passes: GPTQ one per group up to its linears and one propagation; the FP target one more), the Hessian
sums `hessian` seconds per token and in^2 of each group's inputs (twice with the FP target's cross terms),
a GPTQ solve a * out * in^2 + b * in^3 + c * out * in seconds, the error report `stats` * in^2 per
reported row (quantkit.engine.solve.report_rows: every row, or every k-th of a tall linear) and
TLQ's importance pass `backward` seconds per token and parameter. With N ranks the token-proportional
parts divide by N (each rank runs its shard) and the solves by the engine's own plan (quantkit.engine.plan).
"""

from __future__ import annotations

from types import SimpleNamespace

# Rates fitted by benchmarks/bench_real_size.py (--merge) over its runs, CPU seconds on a shared 2-core machine, one
# thread, float32, 1 x 2048 tokens (results/bench_real_size_merged.json): GPTQ on one Llama-3.1-8B layer
# (results/bench_real_size_llama8b_quantkit.json), the FP target and TLQ on one Llama-3.2-1B layer each
# (results/bench_real_size_llama1b_gptq_fp.json, _tlq.json). Each phase's rate comes from one layer (one width);
# the solve models from that layer's four solves (GPTQ: 4096 and 14336 wide; FP target: 2048 and 8192).
# `hessian` is per sum: the FP target's runs sum two (H~ and the cross term C).
CPU = {
    "source": "measured: GPTQ on one Llama-3.1-8B layer, FP target and TLQ on one Llama-3.2-1B layer "
              "(bench_real_size_merged.json)",
    "capture": {"rtn": 0.0, "gptq": 5.7e-11, "gptq_fp": 1.2e-10, "tlq": 1.19e-10},
    "hessian": {"rtn": 0.0, "gptq": 3.3e-11, "gptq_fp": 8.7e-11, "tlq": 8.1e-11},
    "backward": 5.7e-11,
    "solve": (0.0, 1.27e-11, 1.39e-7),  # GPTQ: one Cholesky of H (in^3 / 6) and the column blocks
    "fp_solve": (0.0, 6.57e-11, 5.11e-7),  # GPTQ toward the FP target: its float64 Cholesky solve first
    "stats": 1.29e-10,
}


def _solve_seconds(out: int, inn: int, fp_target: bool = False) -> float:
    a, b, c = CPU["fp_solve" if fp_target else "solve"]
    return a * out * inn * inn + b * inn ** 3 + c * out * inn


def _reported_rows(out_features: int) -> int:
    """Rows whose output-error traces the report sums (quantkit.engine.solve.report_rows)."""
    from quantkit.engine.solve import report_rows

    return len(range(out_features)[report_rows(0, out_features, out_features)])


def estimate_seconds(shape, settings) -> dict:
    """Per-layer and whole-run seconds of a run on CPU; on a GPU, no estimate (no rates measured there yet)."""
    if settings.on_gpu:
        return {"total": None, "note": "no rates measured on a GPU yet (benchmarks/device_check.sh measures them)"}
    from quantkit.engine.plan import plan_group

    key = "rtn" if not settings.hessians else "tlq" if settings.token_weights else "gptq_fp" if settings.uses_fp_target else "gptq"
    ranks = min(settings.nproc, settings.nsamples)
    tokens = -(-settings.nsamples // ranks) * settings.seqlen  # the largest shard
    per_layer = []
    for layer in shape.layers:
        capture = CPU["capture"][key] * tokens * layer.params
        hessian = 0.0
        solve = 0.0
        stats = 0.0
        if settings.hessians:
            cross = 2 if settings.uses_fp_target else 1
            hessian = CPU["hessian"][key] * tokens * cross * sum(w * w for g in layer.groups for w in layer.inputs(g))
            for group in layer.groups:
                linears = {lin.name: SimpleNamespace(in_features=lin.in_features, out_features=lin.out_features) for lin in group}
                load = [0.0] * ranks
                for name, pieces in plan_group(linears, ranks).items():
                    lin = linears[name]
                    for rank, start, end in pieces:
                        load[rank] += _solve_seconds(end - start, lin.in_features, settings.uses_fp_target)
                solve += max(load)
                stats += CPU["stats"] * sum(_reported_rows(lin.out_features) * lin.in_features ** 2 for lin in group) / ranks
        per_layer.append({"capture": capture, "hessian": hessian, "solve": solve, "stats": stats})
    backward = 0.0
    if settings.token_weights and not settings.calib_set:  # every rank runs it on all samples
        backward = CPU["backward"] * settings.nsamples * settings.seqlen * shape.layer_params
    total = sum(sum(p.values()) for p in per_layer) + backward
    first = {k: round(v, 2) for k, v in per_layer[0].items()}
    return {"total": round(total, 1), "per_layer": first, "backward": round(backward, 1), "rates": CPU["source"],
            "note": "CPU, one thread per rank, float32"}
