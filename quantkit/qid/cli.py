"""`quantkit qid`: measure QiD over a checkpoint grid, fit scaling laws, predict, plot."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.cli_options import bounded, output_option
from quantkit.errors import QuantkitError, expect_utf8, unknown_choice
from quantkit.fsutil import atomic_file, check_output_file, check_output_folder


def check_act_bits_cells(act_bits: int | None, bits: list[int], methods: list[str], group_size: int, sym: bool) -> None:
    """Refuse --act-bits with bitsandbytes methods or weight settings the int8 kernels cannot run (before any work)."""
    if act_bits is None:
        return
    from quantkit.qid.measure import BNB_METHODS
    from quantkit.quant.spec import QuantSpec

    if any(m in BNB_METHODS for m in methods):
        raise QuantkitError("--act-bits quantizes activations in rtn/gptq/tlq cells; bitsandbytes methods are weight-only")
    for b in bits:
        QuantSpec(bits=b, group_size=group_size, sym=sym, act_bits=act_bits).validate()


def check_measured_bits(bits: list[int], methods: list[str]) -> None:
    """Every --bits width is one rtn/gptq/tlq can quantize to (bitsandbytes methods have their own)."""
    from quantkit.qid.measure import BNB_METHODS
    from quantkit.quant.spec import SUPPORTED_BITS

    if not any(m not in BNB_METHODS for m in methods):
        return
    if not bits:
        raise QuantkitError(f"--bits is empty; give comma-separated widths from {', '.join(map(str, SUPPORTED_BITS))}")
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad:
        raise QuantkitError(f"--bits {bad[0]} is not a width rtn/gptq/tlq quantize to; use {', '.join(map(str, SUPPORTED_BITS))}")


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """Parse '2,3,4' into [2, 3, 4]."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _str_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """Parse 'rtn,gptq' into ['rtn', 'gptq']."""
    return [v.strip() for v in value.split(",") if v.strip()]




def data_inputs(*sources: str | None) -> list[str]:
    """The local files and directories that data sources read (results must not be written over them)."""
    from quantkit.data.checks import data_paths

    return [path for source in sources if source for path in data_paths(source)]

@click.group()
def qid() -> None:
    """QiD scaling laws: QiD = loss(quantized) - loss(16-bit) on held-out text, vs N, D and bits."""


@qid.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--bits", default="2,3,4", show_default=True, callback=_int_list, help="Bit widths for rtn/gptq/tlq (comma-separated).")
@click.option("--methods", default="rtn,gptq", show_default=True, callback=_str_list,
              help="Comma-separated: rtn, gptq, tlq, bnb-nf4, bnb-fp4, bnb-int8 (bitsandbytes via transformers; fixed bit width).")
@click.option("--eval", "eval_text", required=True, help="Eval text: file, glob, directory or hf:DATASET (named in every row).")
@click.option("--eval-part", type=click.Choice(["all", "train", "heldout"]), default="heldout", show_default=True, help="Part of each eval file to score (heldout = last 10% of its characters).")
@click.option("--eval-tokens", type=bounded("eval_tokens"), default=20_000, show_default=True, help="Token budget: the first N tokens of the eval stream.")
@click.option("--eval-seqlen", type=bounded("eval_seqlen"), default=256, show_default=True, help="Tokens per evaluation window.")
@click.option("--calib", default=None, help="Calibration text (default: the eval source).")
@click.option("--calib-part", type=click.Choice(["all", "train", "heldout"]), default="train", show_default=True, help="Part of each calibration file to draw windows from (train = first 90%).")
@click.option("--nsamples", type=bounded("nsamples"), default=32, show_default=True, help="Calibration windows per quantized model.")
@click.option("--calib-seqlen", type=bounded("calib_seqlen"), default=128, show_default=True, help="Tokens per calibration window.")
@click.option("--group-size", type=bounded("group_size"), default=128, show_default=True, help="Quantization group for rtn/gptq/tlq; -1 per channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric grid, or asymmetric with a fitted zero point.")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True, help="Seed for drawing the calibration windows.")
@click.option("--act-bits", type=click.Choice(["4", "8"]), default=None, help="Quantize the quantized linears' inputs per token too (W8A8/W4A8; needs --group-size -1 --sym); rows' method reads e.g. gptq-a8.")
@click.option("--tokens", multiple=True, help="Training tokens D: TOKENS for all checkpoints or MODEL=TOKENS (repeatable).")
@click.option("--tokens-per-step", type=bounded("tokens_per_step"), default=None, help="D = step x this, for stepN revisions of non-Pythia models.")
@output_option("out_csv", required=True, type=click.Path(dir_okay=False), help="CSV to append to (resumes).")
@click.option("--retry-errors", is_flag=True, help="Measure again the cells recorded as failed.")
@click.option("--threads", type=bounded("threads"), default=None, help="torch threads (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def measure(checkpoints: tuple[str, ...], bits: list[int], methods: list[str], out_csv: str, tokens: tuple[str, ...],
            retry_errors: bool, threads: int | None, no_progress: bool, **settings) -> None:
    """Measure QiD for CHECKPOINTS (dirs or hub-id[@revision]) x bits x methods; append rows to --output."""
    from quantkit.fsutil import note_kept
    from quantkit.models import looks_local
    from quantkit.qid.measure import (
        Measurement,
        measure_grid,
        parse_checkpoint,
        parse_token_overrides,
        plan_cells,
    )

    if settings["eval_tokens"] < settings["eval_seqlen"]:
        raise QuantkitError(f"--eval-tokens {settings['eval_tokens']} is less than one --eval-seqlen "
                            f"{settings['eval_seqlen']} window: nothing to score; give more tokens or a shorter window")
    plan_cells(checkpoints, bits, methods)  # unknown methods, unparsable checkpoint names
    parse_token_overrides(tokens)
    check_measured_bits(bits, methods)
    for name in (*checkpoints, settings["eval_text"]):  # written in the table's UTF-8 model and eval_text columns
        expect_utf8(name, "the checkpoint" if name in checkpoints else "--eval", "the table's text columns cannot hold")
    check_output_file(out_csv, inputs=[*(parse_checkpoint(c).local_dir for c in checkpoints),
                                        *data_inputs(settings["eval_text"], settings["calib"])])
    for spec in checkpoints:
        ckpt = parse_checkpoint(spec)
        if ckpt.local_dir is None and looks_local(ckpt.name):
            raise QuantkitError(f"checkpoint {spec} not found; give a model directory or a hub id[@revision]")
    if settings["act_bits"] is not None:
        settings["act_bits"] = int(settings["act_bits"])
    settings = Measurement(**settings)  # the options' names are its fields
    check_act_bits_cells(settings.act_bits, bits, methods, settings.group_size, settings.sym)
    note_kept(lambda: f"the cells measured so far are in {out_csv}; run again to continue" if Path(out_csv).is_file() else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    stats = measure_grid(list(checkpoints), bits, methods, out_csv, settings, tokens=tokens,
                         retry_errors=retry_errors, progress=not no_progress)
    click.echo(f"{stats['measured']} cell(s) measured, {stats['failed']} failed, {stats['skipped']} already in {out_csv}")


@qid.command()
@click.argument("csv_path", metavar="CSV", type=click.Path(dir_okay=False))
@click.option("--by-bits", is_flag=True, help="Fit each bit width separately (P folded into k).")
@click.option("--method", default=None, help="Fit only this method (default: each method in the table).")
@click.option("--law", "law", type=click.Choice(["all", "unified", "D", "N", "P"]), default="all", show_default=True, help="Which law to fit: the unified one, one single-factor law (D, N or P), or all.")
@click.option("--bootstrap", type=bounded("bootstrap"), default=200, show_default=True, help="Bootstrap resamples for the intervals (0: none).")
@click.option("--level", type=bounded("level"), default=0.95, show_default=True, help="Confidence level of the intervals.")
@click.option("--seed", type=bounded("seed"), default=None, help="Seed for the bootstrap resamples (default 0).")
@click.option("--huber-delta", type=bounded("huber_delta"), default=None, help="Huber loss threshold on log-space residuals (--estimator huber; default 1e-3).")
@click.option("--estimator", type=click.Choice(["wls", "huber"]), default="wls", show_default=True,
              help="wls: least squares weighted by each point's qid_se (plus a fitted misfit term); huber: unweighted Huber loss.")
@click.option("--resample", type=click.Choice(["points", "errors"]), default=None,
              help="Bootstrap by resampling checkpoints (points, the default), or by redrawing each QiD within its "
                   "standard error.")
@click.option("--no-misfit", is_flag=True, help="wls: weight by the measurement errors alone (no misfit term tau).")
@click.option("--json", "as_json", is_flag=True, help="Print the fit as JSON instead of a table.")
@output_option(type=click.Path(dir_okay=False), default=None, help="Write the fit JSON here.")
def fit(csv_path: str, law: str, huber_delta: float, no_misfit: bool, as_json: bool, output: str | None,
        **options) -> None:
    """Fit the unified law QiD = k D^beta / (N^alpha P^gamma) and single-factor laws to a QiD CSV."""
    from quantkit.qid.fit import LAWS, fit_table, format_fits
    from quantkit.qid.regression import fit_settings
    from quantkit.qid.table import read_table

    # options: bootstrap, seed, level, estimator, resample (fit_table's names; None: not given), method, by_bits
    scope = {"method": options.pop("method"), "by_bits": options.pop("by_bits")}
    options.update(delta=huber_delta, misfit=False if no_misfit else None)
    fit_settings(**options)  # refused before the table is read
    if output is not None:
        check_output_file(output, inputs=[csv_path])
    table = read_table(csv_path)
    laws = LAWS if law == "all" else (law,)
    result = fit_table(table, laws=laws, **scope, **options)
    result["csv"] = str(csv_path)
    if output:
        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(json.dumps(result, indent=1) if as_json else format_fits(result))


@qid.command()
@click.option("--law", "law_spec", default="ouyang2024-gptq", show_default=True, help="A published law name or a `qid fit -o` JSON.")
@click.option("--method", default=None, help="Method inside a fit JSON holding several.")
@click.option("--params", "n_params", type=bounded("params"), required=True, help="Non-embedding parameters N (e.g. 7e9).")
@click.option("--bits", type=bounded("predict_bits"), required=True, help="Weight bits P.")
@click.option("--tokens", type=bounded("tokens"), default=None, help="Training tokens D: predict QiD.")
@click.option("--qid", "qid_value", type=bounded("qid"), default=None, help="Target QiD: solve for the training tokens D.")
@click.option("--json", "as_json", is_flag=True, help="Print the prediction as one JSON object.")
def predict(law_spec, method, n_params, bits, tokens, qid_value, as_json) -> None:
    """QiD for (N, D, P), or the training tokens at which N params reach a given QiD at P bits."""
    from quantkit.qid.laws import PLAUSIBLE, check_fitted_bits, check_plausible, law_and_draws

    if (tokens is None) == (qid_value is None):
        raise QuantkitError("give exactly one of --tokens (predict QiD) or --qid (solve for training tokens)")
    check_plausible("params", n_params)
    check_plausible("bits", bits)
    if tokens is not None:
        check_plausible("tokens", tokens)
    else:
        check_plausible("qid", qid_value)
    law, _, chosen = law_and_draws(law_spec, method=method, bits=int(bits) if float(bits).is_integer() else None)
    check_fitted_bits(chosen, bits, law_spec)
    if tokens is not None:
        qid_value = law.qid(n_params, tokens, bits)
        solved = "qid"
    else:
        tokens = law.tokens_for_qid(n_params, qid_value, bits)
        solved = "tokens"
    answer = qid_value if solved == "qid" else tokens
    try:
        check_plausible(solved, answer, "the prediction")
    except QuantkitError:
        what = "QiD" if solved == "qid" else "D"
        raise QuantkitError(f"law {law.name} gives {what} = {answer:.3g} for these inputs, outside the range of "
                            f"{PLAUSIBLE[solved][2]}: it makes no prediction that far "
                            "from the data it was fitted on; check the inputs' units") from None
    out = {"law": law.name, "params": n_params, "bits": bits, "tokens": tokens, "qid": qid_value, "solved_for": solved,
           "coefficients": law.to_dict()}
    if as_json:
        click.echo(json.dumps(out))
    elif solved == "qid":
        click.echo(f"QiD = {qid_value:.6g} nats  (law {law.name}; N={n_params:.4g}, D={tokens:.4g}, P={bits:g})")
    else:
        click.echo(f"D = {tokens:.6g} training tokens  (law {law.name}; N={n_params:.4g}, QiD={qid_value:.4g}, P={bits:g})")


@qid.command("training-level")
@click.argument("model")
@click.option("--law", "law_spec", required=True, help="A `qid fit -o` JSON (its bootstrap draws give the interval), a law JSON {k, alpha, beta, gamma} or a published law name.")
@click.option("--bits", type=bounded("qid_bits"), required=True, help="Weight bits P at which to measure QiD.")
@click.option("--method", default="gptq", show_default=True, help="Quantization method to measure with (and the fit's method to use).")
@click.option("--data", "eval_text", default=None, help="Eval text (file, glob, directory or hf:DATASET); required unless --qid is given.")
@click.option("--eval-part", type=click.Choice(["all", "train", "heldout"]), default="heldout", show_default=True, help="Part of each eval file to score.")
@click.option("--eval-tokens", type=bounded("eval_tokens"), default=201_000, show_default=True, help="Token budget of the eval stream (the sweep's: about 200k scored).")
@click.option("--eval-seqlen", type=bounded("eval_seqlen"), default=256, show_default=True, help="Tokens per evaluation window (the bootstrap unit).")
@click.option("--calib", default=None, help="Calibration text (default: the eval source's train part).")
@click.option("--nsamples", type=bounded("nsamples"), default=32, show_default=True, help="Calibration windows.")
@click.option("--calib-seqlen", type=bounded("calib_seqlen"), default=128, show_default=True, help="Tokens per calibration window.")
@click.option("--group-size", type=bounded("group_size"), default=None, help="Quantization group (default: the fit's, else 128); match the sweep's.")
@click.option("--qid", "qid_value", type=bounded("qid"), default=None, help="Use this measured QiD instead of measuring (MODEL still gives N).")
@click.option("--qid-se", type=bounded("qid_se"), default=None, help="Standard error of --qid.")
@click.option("--level", type=bounded("level"), default=0.95, show_default=True, help="Confidence level of the interval.")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True, help="Seed for calibration windows and the interval's simulation.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@output_option(type=click.Path(dir_okay=False), default=None, help="Write the result JSON here.")
def training_level(model: str, law_spec: str, bits: int, method: str, group_size: int | None, qid_value: float | None,
                   qid_se: float | None, level: float, seed: int, as_json: bool, output: str | None,
                   **measurement) -> None:
    """Measure MODEL's QiD at --bits and invert the fitted law for its training tokens D, with an interval."""
    from quantkit.models import looks_local
    from quantkit.qid.estimate import training_level as estimate
    from quantkit.qid.laws import check_fitted_bits, check_plausible, law_and_draws
    from quantkit.qid.measure import Measurement, measure_model, model_size, parse_checkpoint

    check_plausible("bits", bits)
    if output is not None:
        check_output_file(output, inputs=[model, law_spec, *data_inputs(measurement.get("eval_text"),
                                                                          measurement.get("calib"))])
    from quantkit.qid.measure import ENGINE_METHODS, METHODS

    # a fit's rows name act-quantized sweeps "gptq-a8" (Measurement.label); --qid may pick such a fit
    labels = (*METHODS, *(f"{m}-a{a}" for m in ENGINE_METHODS for a in (4, 8)))
    if method not in labels:
        raise unknown_choice("--method", method, METHODS)
    if qid_value is None:
        check_measured_bits([bits], [method])
    else:
        check_plausible("qid", qid_value)
    if qid_se is not None and qid_value is None:
        raise QuantkitError("--qid-se is the standard error of a given --qid; a measured QiD brings its own: "
                            "give --qid too or drop --qid-se")
    given = [flag for flag, key in (("--data", "eval_text"), ("--calib", "calib")) if measurement.get(key) is not None]
    if qid_value is not None and given:
        raise QuantkitError(f"--qid replaces the measurement, so {' and '.join(given)} would go unused; "
                            f"give --qid or {given[0]}, not both")
    ckpt = parse_checkpoint(model)
    if ckpt.local_dir is None and looks_local(ckpt.name):
        raise QuantkitError(f"model {model} not found; give a model directory or a hub id[@revision]")
    law, draws, chosen = law_and_draws(law_spec, method=method, bits=bits)
    check_fitted_bits(chosen, bits, law_spec)
    fit_groups = chosen.get("group_size") or []
    fit_groups = fit_groups if isinstance(fit_groups, list) else [fit_groups]
    if group_size is not None and fit_groups and group_size not in fit_groups:
        raise QuantkitError(f"--group-size {group_size} is not the group size the law in {law_spec} was fitted on "
                            f"({', '.join(map(str, fit_groups))}); QiD grows as groups widen, so the law would read "
                            f"a QiD of another setting: use --group-size {fit_groups[0]}, or fit a law on rows measured "
                            f"at --group-size {group_size}")
    if qid_value is None:
        if measurement["eval_text"] is None:
            raise QuantkitError("give --data (the eval text to measure QiD on) or a measured --qid")
        if group_size is None:
            group_size = int(fit_groups[0]) if len(fit_groups) == 1 else 128
        # measurement: eval_text, calib, eval_part, eval_tokens, eval_seqlen, nsamples, calib_seqlen (its fields)
        settings = Measurement(**measurement, group_size=group_size, seed=seed)
        measured = measure_model(model, method, bits, settings)
    else:
        params, non_embedding = model_size(model)
        measured = {"model": model, "N": non_embedding, "params": params, "bits": bits, "method": method,
                    "qid": qid_value, "qid_se": qid_se, "measured": False}
    result = estimate(law, measured["N"], measured["qid"], bits, qid_se=measured.get("qid_se"), draws=draws,
                      level=level, seed=seed)
    result["law_source"] = str(law_spec)
    result["measurement"] = measured
    if output:
        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(result))
    else:
        ci = f"  {int(round(100 * level))}% interval [{result['ci'][0]:.4g}, {result['ci'][1]:.4g}]" if result["ci"] else ""
        se = f" +- {measured['qid_se']:.2g}" if measured.get("qid_se") else ""
        click.echo(f"QiD = {measured['qid']:.5g}{se} nats at {bits} bits ({method}); N = {measured['N']:,}")
        click.echo(f"D = {result['tokens']:.4g} training tokens{ci}  (law {law.name})")


@qid.command()
@click.argument("csv_path", metavar="CSV", type=click.Path(dir_okay=False))
@click.option("--fit", "fit_path", type=click.Path(dir_okay=False), default=None, help="A `qid fit -o` JSON: draw its curves.")
@click.option("--method", default=None, help="Plot only this method.")
@click.option("--format", "formats", default="png,svg", show_default=True, callback=_str_list, help="Comma-separated: png, svg, pdf.")
@output_option("out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the figures (created if missing).")
def plot(csv_path, fit_path, method, formats, out_dir) -> None:
    """Figures (PNG and SVG) of QiD vs D per N, vs N, vs P, with fitted curves."""
    from quantkit.qid.laws import read_fit_json
    from quantkit.qid.plot import plot_table
    from quantkit.qid.table import read_table

    if Path(out_dir, "config.json").is_file():
        raise QuantkitError(f"-o {out_dir} is a model directory (it holds config.json); write the figures elsewhere")
    check_output_folder(out_dir)
    fit_doc = read_fit_json(fit_path) if fit_path else None
    paths = plot_table(read_table(csv_path), out_dir, fit=fit_doc, method=method, formats=tuple(formats))
    for p in paths:
        click.echo(str(p))
