"""`quantkit calibrate`: data -> (importance) -> layer-wise engine -> export, in one command."""

from __future__ import annotations

import json
import time

import click

from quantkit.errors import QuantkitError
from quantkit.fsutil import check_output_dir
from quantkit.quant.spec import SUPPORTED_BITS, QuantSpec

METHODS = ("rtn", "gptq", "tlq")
FORMATS = ("gptq", "gptq_v2", "compressed-tensors", "fake")


def default_format(bits: int) -> str:
    """compressed-tensors where its packing holds the bit width (4, 8), GPTQ v2 otherwise."""
    return "compressed-tensors" if bits in (4, 8) else "gptq_v2"


def run_calibration(
    model_name: str,
    output: str,
    spec: QuantSpec,
    method: str = "gptq",
    calib: str | None = None,
    calib_set: str | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    part: str = "all",
    fmt: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Quantize `model_name` on calibration data and export it to `output`; return the report."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.export import save_quantized
    from quantkit.models import load_model

    if method not in METHODS:
        raise QuantkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    spec.validate()
    fmt = fmt or default_format(spec.bits)
    check_output_dir(output, overwrite)
    if calib is None and calib_set is None:
        raise QuantkitError("no calibration data; pass --calib PATH (text, jsonl, dataset or recipe) or --calib-set DIR")
    started = time.perf_counter()
    model = load_model(model_name, dtype=dtype)
    token_weights = None
    if calib_set is not None:
        from quantkit.importance import load_calibration_set

        samples, set_weights = load_calibration_set(calib_set, model_name, model)
        if method == "tlq":
            token_weights = set_weights
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        samples = calibration_samples(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part)
        if method == "tlq":
            from quantkit.importance import tlq_token_weights

            token_weights = tlq_token_weights(model, samples, device=device, progress=progress)
    calibration = calibrate_model(
        model, samples, spec, method=method, device=device, token_weights=token_weights, progress=progress
    )
    report = dict(calibration.report)
    report.update(
        model=model_name,
        calib=calib,
        calib_set=calib_set,
        seqlen=int(samples[0]["input_ids"].shape[-1]),
        seed=seed,
        format=fmt,
        total_seconds=round(time.perf_counter() - started, 3),
    )
    save_quantized(model, calibration.results, output, fmt=fmt, source=model_name, report=report, overwrite=overwrite)
    return report


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice(METHODS), default="gptq", show_default=True, help="Solver: round-to-nearest, GPTQ, or TLQ (importance-weighted GPTQ).")
@click.option("--bits", type=int, default=4, show_default=True, help=f"Weight bits, one of {SUPPORTED_BITS}.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Columns per quantization group; -1 for per-channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric grid (zero in the middle) or asymmetric (fitted zero point).")
@click.option("--act-order/--no-act-order", default=False, show_default=True, help="GPTQ desc_act: solve columns by decreasing Hessian diagonal.")
@click.option("--static-groups", is_flag=True, help="With --act-order: fix group grids before the column permutation.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Dampening: fraction of the mean Hessian diagonal added to it.")
@click.option("--mse", is_flag=True, help="Search a clipping ratio per group that minimises grid MSE.")
@click.option("--calib", help="Calibration data: .txt/.jsonl file, glob, directory, hf:DATASET, or a calib/ recipe (.yaml).")
@click.option("--calib-set", type=click.Path(), help="A token-level calibration set made by `quantkit importance` (replaces --calib).")
@click.option("--part", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True, help="Part of each text file to draw from (held-out = last 10%).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing calibration windows.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Export format (default: compressed-tensors for 4/8 bits, gptq_v2 otherwise).")
@click.option("--device", default="cpu", show_default=True, help="Compute device for the current layer (cpu, cuda, cuda:1).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True, help="Dtype to load the model in.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
def calibrate(model, method, bits, group_size, sym, act_order, static_groups, damp, mse, calib, calib_set, part, nsamples, seqlen, seed, fmt, device, dtype, output, overwrite, as_json) -> None:
    """Quantize MODEL (a local directory or hub id) layer by layer and export it."""
    if nsamples <= 0 or seqlen <= 1:
        raise QuantkitError("--nsamples must be positive and --seqlen at least 2")
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups, damp=damp, mse=mse)
    report = run_calibration(
        model, output, spec, method=method, calib=calib, calib_set=calib_set, nsamples=nsamples, seqlen=seqlen,
        seed=seed, part=part, fmt=fmt, device=device, dtype=dtype, overwrite=overwrite, progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "layers"} | {"output": output}))
    else:
        click.echo(f"quantized {model} with {method} w{bits} g{group_size} in {report['total_seconds']:.1f}s -> {output} ({report['format']})")
