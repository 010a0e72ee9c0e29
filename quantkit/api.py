"""quantkit.quantize: the Python entry point; it builds and runs the same CalibrationJob as `quantkit calibrate`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from quantkit.calibrate.job import OPTIONS
from quantkit.errors import checked_call


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


@checked_call
def quantize(
    model: Any,
    tokenizer_or_processor: Any = None,
    data: Any = None,
    *,
    method: str | None = None,
    bits: int = OPTIONS["bits"],
    group_size: int = OPTIONS["group_size"],
    output_dir: str | os.PathLike | None = None,
    format: str | None = None,
    recipe: Any = None,
    reload: bool = True,
    **options: Any,
) -> Quantized:
    """Quantize a model (hub id, path or loaded PreTrainedModel) on calibration data; export it when output_dir is given.

    data is a path or source spec (text, JSONL, directory, glob, hf:NAME, calib/ recipe: cut into nsamples
    windows of seqlen tokens), a list of strings (several: each one sample, cut to its first seqlen tokens,
    nsamples of them drawn with the seed where there are more, one warning where there are fewer; a single
    string: one long text cut into windows as a file is), a list of image-text records {"image": path or PIL image, "text" or "messages"}, a list of chat records
    {"messages": [{"role", "content"}, ...]} (rendered with the tokenizer's chat template, the loss mask on the
    assistant's tokens), or a datasets.Dataset (a "text" or "messages" column, or "image" with
    "text"/"messages"); `calib_set=DIR` reuses a token-level set from
    `quantkit importance` instead. tokenizer_or_processor defaults to the one saved with the model. A
    loaded model is quantized in place. Bad input raises quantkit.errors.QuantkitError with the one-line
    message the CLI prints, before any model forward and with nothing written.

    method is rtn, gptq or tlq; None means quantkit.quant.methods.default_method: TLQ with the FP target, whose
    gradient pass gives output-side factors on text and token weights on image-text (quantkit.importance.tlq_defaults;
    under low_memory without a calib_set: GPTQ with the FP target, since the gradient pass needs the whole model),
    as for `quantkit calibrate`.

    recipe is a quantkit.Recipe, its mapping form or a YAML file: which linears to quantize (targets), which
    to leave in full precision (ignore) and per-module overrides of bits, group_size, sym, act_order and
    method, the arguments above being its defaults (quantkit.quant.recipe; docs/commands.md "Recipes").

    options are the rest of `quantkit calibrate`'s settings under their Python names, with the same defaults
    (quantkit.calibrate.OPTIONS): the solver's sym, act_order, static_groups, damp, mse, cd_sweeps, fp_target;
    act_bits=8 (or 4) quantizes every quantized linear's input per token at inference, dynamically and
    symmetrically (W8A8 with bits=8, W4A8 with bits=4; group_size=-1, sym=True); smooth="uniform" or "tlq"
    folds per-channel smoothing scales into the model first (quantkit.quant.smooth), alpha searched per
    fold with uniform or TLQ token weights; "auto" (the default) smooths only with act_bits, TLQ-weighted
    for method="tlq" and uniform otherwise, and "none" never. The data's nsamples and seqlen (None, the default:
    a calib/ recipe's own, else 128 and 512), seed, part, calib_set and chat_template (a Jinja template file for
    chat records); lm_head, vision, importance (TLQ's
    gradient-pass options: guidance, row_groups, loss, draws, lam, power); dtype, device, nproc, devices,
    dist_timeout, low_memory, offload_dir, resume, progress; overwrite, push_to_hub=REPO (uploads the export,
    model card included, with huggingface_hub; private= for a new repo; without output_dir it is exported to a
    temporary directory for the upload). reload=False skips reading a multi-rank run's export back into
    memory (model is then None).
    """
    from quantkit.calibrate import OPTIONS, build_job
    from quantkit.calibrate import run as runner
    from quantkit.errors import expect_bool, expect_names

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    expect_bool("reload", reload)
    # other toolkits' names of this function's own arguments (tokenizer=, dataset=) are pointed to them too
    expect_names("option", options, [*OPTIONS, "data", "tokenizer_or_processor"])
    job = build_job(model, data, tokenizer_or_processor, method=method, bits=bits, group_size=group_size,
                    output_dir=output_dir, format=format, recipe=recipe, **options)
    outcome = runner.run_job(job)
    quantized = outcome.model
    if reload and quantized is None and outcome.output_dir is not None and not job.run.low_memory:
        from quantkit.export.load import load_quantized

        quantized = load_quantized(outcome.output_dir)  # the ranks' model lived in other processes: read their export
    if job.run.low_memory:
        quantized = None  # a streamed run's model does not fit in memory: its skeleton is no model to use
    return Quantized(model=quantized, report=outcome.report, results=outcome.results, output_dir=outcome.output_dir,
                     hub_url=outcome.hub_url)
