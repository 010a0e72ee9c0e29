"""Seconds a calibration run takes, from the rates benchmarks/bench_real_size.py measured (CPU, one thread,
float32; figures and command in benchmarks/results/bench_real_size.json).

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

# GPTQ's rates: benchmarks/results/bench_real_size.json (one Llama-3.2-1B layer, 1 x 2048 tokens, CPU seconds on
# a shared 2-core machine: `bench_real_size.py --shapes llama-1b --layers 1 --nsamples 1 --seqlen 2048 --methods
# gptq`), fitted by the benchmark. Not measured at real widths yet, so assumed: the FP target's and TLQ's capture
# are GPTQ's x 1.5 (one more forward per group), TLQ's backward 3x GPTQ's capture per token and parameter (a
# backward is about two forwards, plus the recomputed block). One width only: the out x in^2 term fitted to 0.
CPU = {
    "source": "GPTQ measured on one Llama-3.2-1B layer (bench_real_size.json); FP target and TLQ provisional",
    "capture": {"rtn": 0.0, "gptq": 8.0e-11, "gptq_fp": 1.2e-10, "tlq": 1.2e-10},
    "hessian": 3.8e-11,
    "backward": 2.4e-10,
    "solve": (0.0, 4.5e-11, 3.8e-7),
    "stats": 1.5e-10,
}


def _solve_seconds(out: int, inn: int) -> float:
    a, b, c = CPU["solve"]
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
            hessian = CPU["hessian"] * tokens * cross * sum(w * w for g in layer.groups for w in layer.inputs(g))
            for group in layer.groups:
                linears = {lin.name: SimpleNamespace(in_features=lin.in_features, out_features=lin.out_features) for lin in group}
                load = [0.0] * ranks
                for name, pieces in plan_group(linears, ranks).items():
                    lin = linears[name]
                    for rank, start, end in pieces:
                        load[rank] += _solve_seconds(end - start, lin.in_features)
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
