"""`quantkit calibrate`: data -> (importance) -> layer-wise engine -> export, in one command.

The command builds the CalibrationJob (quantkit.calibrate.job.build_job, as quantkit.quantize does) from
its options and runs it (quantkit.calibrate.run.run_job); the options' defaults are build_job's.
"""

from __future__ import annotations

import json

import click

from quantkit.calibrate import run as runner
from quantkit.calibrate.job import OPTIONS, build_job
from quantkit.cli_options import bounded, output_option
from quantkit.errors import QuantkitError
from quantkit.export.formats import FORMATS
from quantkit.importance.cli import importance_options, sample_options
from quantkit.quant.methods import (
    DEFAULT_EXPERT_TOKENS,
    DEFAULT_METHOD,
    EXPERT_TOKENS,
    METHODS,
)
from quantkit.quant.smooth import AUTO, SMOOTH_MODES
from quantkit.quant.spec import SUPPORTED_BITS

# the CLI's names of TLQ's gradient-pass options -> build_job's importance keys
IMPORTANCE_FLAGS = {"guidance": "guidance", "row_groups": "row_groups", "importance_loss": "loss",
                    "fisher_draws": "draws", "lam": "lam", "power": "power", "output_side": "output_side"}


def job_from_options(model: str, options: dict, progress: bool = True):
    """The CalibrationJob of `quantkit calibrate`'s options as click passes them (also `quantkit plan`'s)."""
    calib, devices = options.pop("calib"), options.pop("devices")
    try:
        options["devices"] = [int(d) for d in devices.split(",")] if devices is not None else None
    except ValueError:
        raise QuantkitError(f"--devices must be comma-separated GPU ids such as 0,1,2, got {devices!r}") from None
    if options["devices"] and not options["device"].startswith("cuda"):
        options["device"] = "cuda"
    options["importance"] = {key: options.pop(flag) for flag, key in IMPORTANCE_FLAGS.items()}
    if options.pop("all_experts"):
        if options["expert_tokens"] not in (None, "all"):
            raise QuantkitError(f"--all-experts is --expert-tokens all, and --expert-tokens {options['expert_tokens']} "
                                "is given too; give one")
        options["expert_tokens"] = "all"
    if options["act_bits"] is not None:
        options["act_bits"] = int(options["act_bits"])
    return build_job(model, calib, progress=progress, **options)


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice(list(METHODS)), default=None, help=f"Solver: round-to-nearest, GPTQ, or TLQ (GPTQ guided by a gradient pass: output-side factors on text, token weights on image-text). Default: {DEFAULT_METHOD} with the FP target.")
@click.option("--bits", type=bounded("bits"), default=OPTIONS["bits"], show_default=True, help=f"Weight bits, one of {SUPPORTED_BITS}.")
@click.option("--group-size", type=bounded("group_size"), default=OPTIONS["group_size"], show_default=True, help="Columns per quantization group; -1 for per-channel.")
@click.option("--sym/--asym", default=OPTIONS["sym"], show_default=True, help="Symmetric grid (zero in the middle) or asymmetric (fitted zero point).")
@click.option("--act-order/--no-act-order", default=OPTIONS["act_order"], show_default=True, help="GPTQ desc_act: solve columns by decreasing Hessian diagonal.")
@click.option("--static-groups/--dynamic-groups", default=None, help="With --act-order: fix group grids before the column permutation (default), or fit each group as the solve reaches it (GPTQ g_idx; gptq formats only).")
@click.option("--cd-sweeps", type=bounded("cd_sweeps"), default=OPTIONS["cd_sweeps"], show_default=True, help="Coordinate-descent sweeps over the GPTQ codes on the layer objective (never raises it).")
@click.option("--damp", type=bounded("damp"), default=OPTIONS["damp"], show_default=True, help="Dampening: fraction of the mean Hessian diagonal added to it.")
@click.option("--fp-target/--no-fp-target", default=None, help="Fit each linear to the FP model's output on the FP model's inputs (GPTAQ-style; one more FP layer pass per layer). Default: on for tlq, off for gptq.")
@importance_options
@click.option("--quantize-lm-head", "lm_head", is_flag=True, help="Quantize lm_head too (after the decoder layers; compressed-tensors or fake export).")
@click.option("--quantize-vision", "vision", is_flag=True, help="Quantize a VLM's vision tower and projector too (before the language model, plain Hessians; compressed-tensors or fake export).")
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False), default=None, help="A YAML quantization recipe: targets and ignore patterns, per-module overrides of bits, group size, sym, act-order and method (the flags above are its defaults; docs/commands.md \"Recipes\").")
@click.option("--mse", is_flag=True, help="Search a clipping ratio per group that minimises grid MSE.")
@click.option("--expert-tokens", type=click.Choice(list(EXPERT_TOKENS)), default=None, help=f"Mixture of experts: the tokens of each expert's statistics (the layer's output always keeps the router's choice): routed (those routed to it), all (every calibration token), or mix (routed ones plus every token, weighted to count as many tokens as the projection has inputs). Default: {DEFAULT_EXPERT_TOKENS}.")
@click.option("--all-experts", "all_experts", is_flag=True, help="The same as --expert-tokens all.")
@click.option("--act-bits", type=click.Choice(["4", "8"]), default=None, help="Also quantize every quantized linear's input per token (dynamic, symmetric): W8A8 with --bits 8, W4A8 with --bits 4, W4A4 with --bits 4 --act-bits 4 (never narrower than the weights); needs --group-size -1 --sym.")
@click.option("--smooth", type=click.Choice((AUTO, *SMOOTH_MODES)), default=OPTIONS["smooth"], show_default=True, help="Fold per-channel smoothing scales into norms and linears before the solve, alpha searched per fold on the layer error with uniform or TLQ token weights; auto: none for weight-only runs, with --act-bits tlq for --method tlq and uniform otherwise.")
@click.option("--calib", help="Calibration data: .txt/.jsonl file, glob, directory, hf:DATASET, a calib/ recipe (.yaml), or chat records ({\"messages\": [...]} JSONL); --method rtn needs none.")
@click.option("--calib-set", type=click.Path(), help="A token-level calibration set made by `quantkit importance` (replaces --calib).")
@sample_options
@click.option("--seed", type=bounded("seed"), default=OPTIONS["seed"], show_default=True, help="Seed for drawing calibration windows.")
@click.option("--format", "format", type=click.Choice(list(FORMATS)), default=None, help="Export format (default: compressed-tensors, which plain transformers loads at every width and vLLM at 4 and 8 bits; gptq/gptq_v2 load with gptqmodel and in vLLM).")
@click.option("--device", default=OPTIONS["device"], show_default=True, help="Compute device for the current layer (cpu, cuda, cuda:1).")
@click.option("--nproc", type=bounded("nproc"), default=OPTIONS["nproc"], show_default=True, help="Ranks to spawn locally (samples sharded, linears solved in parallel); gloo on CPU, NCCL on GPU.")
@click.option("--devices", help="Comma-separated GPU ids, one per rank (with --device cuda), e.g. 0,1,2.")
@click.option("--dist-timeout", type=bounded("dist_timeout"), default=OPTIONS["dist_timeout"], show_default=True, help="Seconds a rank waits on the others before giving up.")
@click.option("--low-memory", is_flag=True, help="Stream one decoder layer at a time from the safetensors files; finished layers go to OUTPUT.partial.")
@click.option("--offload-dir", type=click.Path(), help="With --low-memory: keep the calibration activations on disk here.")
@click.option("--resume", is_flag=True, help="Continue an interrupted --low-memory run from OUTPUT.partial (implies --low-memory).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=OPTIONS["dtype"], show_default=True, help="Dtype to load the model in.")
@output_option("output_dir", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", default=None, help="Upload the export (model card included) to this hub model repo, OWNER/NAME.")
@click.option("--private", is_flag=True, default=None, help="With --push-to-hub: create the repo private.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
@click.option("--dry-run", "dry_run", is_flag=True, help="Print what the run needs per rank (memory, disk, time: `quantkit plan`) and stop before loading the model.")
def calibrate(model: str, **options) -> None:
    """Quantize MODEL (a local directory or hub id) layer by layer and export it."""
    as_json, dry_run = options.pop("as_json"), options.pop("dry_run")
    job = job_from_options(model, options, progress=not as_json)
    if dry_run:
        from quantkit.calibrate.budget import limits, plan_job
        from quantkit.calibrate.preflight import preflight
        from quantkit.planner.report import emit

        preflight(job)
        plan = plan_job(job)
        emit(plan, *limits(plan), as_json)
        return
    outcome = runner.run_job(job)
    report, output = outcome.report, job.export.output
    pushed = {"hub_url": outcome.hub_url} if outcome.hub_url else {}
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "layers"} | {"output": output} | pushed))
    else:
        for line in summary_lines(job, report, model, options["recipe"]):
            click.echo(line)
        if outcome.hub_url:
            click.echo(f"pushed to {outcome.hub_url}")


def summary_lines(job, report: dict, model: str, recipe: str | None) -> list[str]:
    """What a run prints: a table of its layers (error with plain rounding and solved, time), what was quantized,
    the weights' size beside the source's and how to load the export."""
    from quantkit.engine.report import error_summary, layer_table
    from quantkit.export.formats import format_for
    from quantkit.export.summary import load_line, size_line

    q, output = job.quantization, job.export.output
    mixed = f" + recipe {recipe}" if recipe else ""
    errors = error_summary(report)
    return [*layer_table(report),
            f"quantized {model} with {q.method} w{q.weights.bits} g{q.weights.group_size}{mixed} in "
            f"{report['total_seconds']:.1f}s -> {output} ({report['format']})",
            *([errors] if errors else []),
            size_line(model, output),
            load_line(output, format_for(report["format"]))]
