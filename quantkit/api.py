"""quantkit.quantize: the Python entry point; `quantkit calibrate` is a thin layer over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError


@dataclass
class Quantized:
    """quantize's result; unpacks as (model, report).

    model holds the dequantized weights in place of the quantized linears (None after a --low-memory run,
    whose model does not fit in memory; loaded back from the export after a multi-rank run); results are
    the exact integer codes per linear (None where the run was not in this process); output_dir is where
    the export went (or None), hub_url where push_to_hub uploaded it."""

    model: Any
    report: dict
    results: dict | None = field(default=None, repr=False)
    output_dir: str | None = None
    hub_url: str | None = None

    def __iter__(self) -> Iterator:
        """model, report: so that `model, report = quantkit.quantize(...)` works."""
        return iter((self.model, self.report))


def quantize(
    model: Any,
    tokenizer_or_processor: Any = None,
    data: Any = None,
    *,
    method: str = "tlq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = True,
    static_groups: bool | None = None,
    damp: float = 0.01,
    mse: bool = False,
    cd_sweeps: int = 0,
    fp_target: bool | None = None,
    act_bits: int | None = None,
    smooth: str = "auto",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    part: str = "all",
    output_dir: str | os.PathLike | None = None,
    format: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    progress: bool = True,
    reload: bool = True,
    push_to_hub: str | None = None,
    private: bool | None = None,
    recipe: Any = None,
    **options: Any,
) -> Quantized:
    """Quantize a model (hub id, path or loaded PreTrainedModel) on calibration data; export it when output_dir is given.

    data is a path or source spec (text, JSONL, directory, glob, hf:NAME, calib/ recipe), a list of strings,
    a list of image-text records {"image": path or PIL image, "text" or "messages"}, a list of chat records
    {"messages": [{"role", "content"}, ...]} (rendered with the tokenizer's chat template, the loss mask on the
    assistant's tokens), or a datasets.Dataset (a "text" or "messages" column, or "image" with
    "text"/"messages"); `calib_set=DIR` reuses a token-level set from
    `quantkit importance` instead. tokenizer_or_processor defaults to the one saved with the model. A
    loaded model is quantized in place. Bad input raises quantkit.errors.QuantkitError with the one-line
    message the CLI prints, before any model forward and with nothing written.

    act_bits=8 (or 4) quantizes every quantized linear's input per token at inference, dynamically and
    symmetrically (W8A8 with bits=8, W4A8 with bits=4; group_size=-1, sym=True); smooth="uniform" or "tlq"
    folds per-channel smoothing scales into the model first (quantkit.quant.smooth), alpha searched per
    fold with uniform or TLQ token weights; "auto" (the default) smooths only with act_bits, TLQ-weighted
    for method="tlq" and uniform otherwise, and "none" never.

    recipe is a quantkit.Recipe, its mapping form or a YAML file: which linears to quantize (targets), which
    to leave in full precision (ignore) and per-module overrides of bits, group_size, sym, act_order and
    method, the arguments above being its defaults (quantkit.quant.recipe; README "Recipes").

    push_to_hub=REPO uploads the export (model card included) with huggingface_hub (private= for a new repo);
    without output_dir it is exported to a temporary directory for the upload.

    options are the rest of `quantkit calibrate`'s settings under their Python names: lm_head, vision,
    importance (TLQ's gradient-pass options: guidance, row_groups, loss, draws, lam, power), calib_set,
    chat_template (a Jinja template file for chat records), nproc, devices, dist_timeout, low_memory,
    offload_dir, resume. reload=False skips reading a multi-rank
    run's export back into memory (model is then None).
    """
    from quantkit.quant.methods import method_for
    from quantkit.quant.smooth import resolve_smooth
    from quantkit.quant.spec import QuantSpec

    if recipe is not None:
        options = {**options, "recipe": recipe}  # checked with the model's linears, before it loads
    unknown = set(options) - ALLOWED_OPTIONS - {"recipe"}
    if unknown:
        raise QuantkitError(f"quantize() got unknown options {sorted(unknown)}; known: {', '.join(sorted(ALLOWED_OPTIONS))}")
    if data is None and options.get("calib_set") is None:
        raise QuantkitError("no calibration data; pass data= (a path, texts, image-text records or a Dataset) "
                            "or calib_set=DIR")
    if nsamples <= 0 or seqlen <= 1:
        raise QuantkitError("--nsamples must be positive and --seqlen at least 2")
    if static_groups and not act_order:
        raise QuantkitError("--static-groups fixes the groups of an --act-order solve; drop it or drop --no-act-order")
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     static_groups=act_order if static_groups is None else static_groups, damp=damp, mse=mse,
                     cd_sweeps=cd_sweeps, act_bits=act_bits,
                     smooth=resolve_smooth(smooth, act_bits, method_for(method).token_weights))
    output = None if output_dir is None else os.fspath(output_dir)
    with contextlib.ExitStack() as scope:
        if push_to_hub is not None:
            from quantkit.export.hub import check_repo_id

            check_repo_id(push_to_hub)
            if output is None:
                output = str(Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="quantkit-push-"))) / "export")
        result = _quantize(model, output, spec, method, data, nsamples, seqlen, seed, part, format, device, dtype,
                           overwrite, progress, fp_target, tokenizer_or_processor, reload, options)
        if push_to_hub is not None:
            from quantkit.export.hub import push_export

            result.hub_url = push_export(output, push_to_hub, private=private)
            if output_dir is None:
                result.output_dir = None  # the temporary export is gone with this block
    return result


def _quantize(model: Any, output: str | None, spec: Any, method: str, data: Any, nsamples: int, seqlen: int, seed: int,
              part: str, fmt: str | None, device: str, dtype: str, overwrite: bool, progress: bool,
              fp_target: bool | None, tokenizer: Any, reload: bool, options: dict) -> Quantized:
    """One calibrate_job run, packaged as a Quantized."""
    from quantkit import calibrate

    outcome = calibrate.calibrate_job(
        model, output, spec, method=method, calib=data, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part,
        fmt=fmt, device=device, dtype=dtype, overwrite=overwrite, progress=progress, fp_target=fp_target,
        tokenizer=tokenizer, **options,
    )
    quantized = outcome.model
    if quantized is not None and spec.act_bits is not None and outcome.results:
        from quantkit.engine.activations import quantize_model_activations

        # the model comes back as it was calibrated and as the export runs: its quantized linears' inputs quantized
        quantize_model_activations(quantized, sorted(outcome.results), spec.act_bits)
    if reload and quantized is None and output is not None and not outcome.report.get("low_memory"):
        from quantkit.export.checkpoint import load_quantized

        quantized = load_quantized(output)  # the ranks' model lived in other processes: read their export
    return Quantized(model=quantized, report=outcome.report, results=outcome.results, output_dir=output)


# quantize's **options: calibrate_job's keywords that quantize does not name itself.
ALLOWED_OPTIONS = frozenset({"lm_head", "vision", "importance", "calib_set", "nproc", "devices", "dist_timeout",
                             "low_memory", "offload_dir", "resume", "hooks", "chat_template"})
