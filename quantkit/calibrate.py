"""`quantkit calibrate`: data -> (importance) -> layer-wise engine -> export, in one command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist

from quantkit.cli_options import output_option
from quantkit.data.calibration import (
    is_source,
    load_calibration,
    load_data_tokenizer,
    memory_calibration,
)
from quantkit.engine.comm import Comm, Hooks
from quantkit.engine.distributed import init_from_env, spawn_ranks, under_torchrun
from quantkit.engine.driver import calibrate_model
from quantkit.engine.streaming import calibrate_streaming
from quantkit.errors import QuantkitError
from quantkit.export import FORMATS, default_format, format_for, save_quantized
from quantkit.export.streamed import export_streamed
from quantkit.fsutil import check_output_dir, scratch_dir
from quantkit.importance import load_calibration_set, tlq_token_weights
from quantkit.importance.cli import importance_options
from quantkit.models import is_vlm, load_model
from quantkit.models.streamed import build_skeleton
from quantkit.quant.methods import METHODS, method_for
from quantkit.quant.recipe import Recipe, as_recipe
from quantkit.quant.smooth import AUTO, SMOOTH_MODES, smooth_uses_token_weights
from quantkit.quant.spec import SUPPORTED_BITS, QuantSpec
from quantkit.validate import (
    check_activation_options,
    preflight_calibration,
    private_tempdir,
    resumable_work,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationJob:
    """What one calibration run does, whichever way it runs (one process, ranks, low memory)."""

    model_name: str
    output: str
    spec: QuantSpec
    method: str
    calib: str | None
    calib_set: str | None
    nsamples: int
    seqlen: int
    seed: int
    part: str
    fmt: str
    dtype: str
    overwrite: bool
    progress: bool
    fp_target: bool
    lm_head: bool = False
    vision: bool = False
    importance: dict | None = None  # TLQ's importance options (quantkit.importance.tlq_token_weights)
    low_memory: bool = False  # layers streamed from the files, finished ones kept in OUTPUT.partial
    offload_dir: str | None = None
    resume: bool = False
    recipe: Recipe | None = None  # which linears to quantize and per-module settings (quantkit.quant.recipe)
    chat_template: str | None = None  # a Jinja file rendering chat records instead of the tokenizer's template
    hooks: Hooks | None = None  # what tests change on every rank (quantkit.engine.comm.Hooks)
    # In-process runs only (quantkit.quantize): a loaded model, its tokenizer or processor, in-memory data.
    model: Any = field(default=None, repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    data: Any = field(default=None, repr=False, compare=False)

    def finish_report(self, report: dict, samples: list[dict], started: float) -> dict:
        """The engine's report with the job's settings and the total time added."""
        calib = self.calib if self.data is None else f"in-memory {type(self.data).__name__} of {len(self.data)} items"
        return dict(report, model=self.model_name, calib=calib, calib_set=self.calib_set,
                    part=None if self.calib_set is not None else self.part,
                    seqlen=max(int(s["input_ids"].shape[-1]) for s in samples), nsamples=len(samples), seed=self.seed,
                    format=self.fmt,
                    total_seconds=round(time.perf_counter() - started, 3))

    def fingerprint(self) -> dict:
        """What a resumed low-memory run must share with the interrupted one."""
        return {"model": str(Path(self.model_name).resolve()), "method": self.method, "spec": self.spec.to_dict(),
                "calib": self.calib, "calib_set": self.calib_set, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed, "part": self.part, "dtype": self.dtype, "fp_target": self.fp_target,
                "lm_head": self.lm_head, "vision": self.vision, "chat_template": self.chat_template,
                **({"recipe": self.recipe.to_dict()} if self.recipe is not None else {})}


@dataclass
class Outcome:
    """What a calibration run gives back: the report and, when it ran in this process, the quantized model
    (dequantized weights in place) and its exact codes per linear."""

    report: dict
    model: torch.nn.Module | None = None
    results: dict | None = None


def run_calibration(model_name: str, output: str, spec: QuantSpec, **options) -> dict:
    """Quantize `model_name` on calibration data and export it to `output`; return the report (calibrate_job)."""
    return calibrate_job(model_name, output, spec, **options).report


def calibrate_job(
    model_name: str | torch.nn.Module,
    output: str | None,
    spec: QuantSpec,
    method: str = "gptq",
    calib: object = None,
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
    nproc: int = 1,
    devices: list[int] | None = None,
    dist_timeout: float = 600.0,
    low_memory: bool = False,
    offload_dir: str | None = None,
    resume: bool = False,
    fp_target: bool | None = None,
    lm_head: bool = False,
    vision: bool = False,
    importance: dict | None = None,
    hooks: Hooks | None = None,
    tokenizer: Any = None,
    chat_template: str | os.PathLike | None = None,
    recipe: Recipe | str | os.PathLike | None = None,
) -> Outcome:
    """Quantize `model_name` on calibration data and export it to `output`: the one path of `quantkit
    calibrate` and quantkit.quantize.

    model_name is a local directory or hub id, or a loaded model (quantized in place; one process, no
    low_memory). calib is a source spec or in-memory data (quantkit.data.calibration.memory_calibration);
    tokenizer a tokenizer or processor to use instead of the model's saved one. output None exports
    nothing. fp_target None means the method's default (quantkit.quant.methods: on for TLQ only). lm_head
    quantizes the output head too (after the decoder layers, from their quantized outputs), vision a
    VLM's vision tower and projector (before them); both export to compressed-tensors or fake.
    importance holds TLQ's options for its gradient pass (guidance, row_groups, loss, draws, lam,
    power: quantkit.importance.tlq_token_weights); a --calib-set carries its own. chat_template is a Jinja
    file that renders chat records ({"messages": [...]}) instead of the tokenizer's own template.

    nproc > 1 spawns that many local ranks (gloo on CPU, NCCL on GPU, `devices` mapping ranks to
    GPUs); under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) this process is one rank. Samples are
    sharded over the ranks and rank 0 exports. low_memory streams one decoder layer at a time from
    the safetensors files (on every rank) and checkpoints each finished layer in OUTPUT.partial;
    resume continues an interrupted run from there (resume and offload_dir imply low_memory).
    hooks are for tests: a callable run as each rank enters each layer, the row-split plan.
    recipe (a Recipe, its mapping or a YAML path: quantkit.quant.recipe) picks the linears to quantize and
    overrides settings per module, `spec` and `method` being its defaults; it is checked against the
    model's linears before the model loads.
    """
    chosen = method_for(method)
    spec.validate()
    recipe = as_recipe(recipe)
    if importance:
        from quantkit.importance import TLQ_DEFAULTS, check_guidance, check_settings

        # before the model loads: a bad option must not cost a load and a forward pass
        options = TLQ_DEFAULTS | importance
        check_settings(options["lam"], options["power"], None, 0.1)
        check_guidance(options["guidance"], options["row_groups"], options["loss"], options["draws"])
    if fmt is None:
        # a format that holds every bit width the recipe uses
        widths = sorted(recipe.bits(spec.bits)) if recipe is not None else [spec.bits]
        fmt = default_format(next((b for b in widths if default_format(b) != default_format(spec.bits)), spec.bits))
    loaded = model_name if isinstance(model_name, torch.nn.Module) else None
    if output is not None:
        check_output_dir(output, overwrite)
    if calib is None and calib_set is None:
        raise QuantkitError("no calibration data; pass --calib PATH (text, jsonl, dataset or recipe) or --calib-set DIR")
    if nproc < 1:
        raise QuantkitError(f"--nproc must be at least 1, got {nproc}")
    if fp_target and not chosen.needs_activations:
        raise QuantkitError(f"--fp-target needs a method that reads activations (gptq, tlq): {chosen} reads none")
    if fp_target is None:
        fp_target = chosen.fp_target_default
    check_format_holds(fmt, lm_head=lm_head, vision=vision)
    low_memory = bool(resume or low_memory or offload_dir)
    check_activation_options(spec, fmt, chosen)
    in_memory_data = calib is not None and not is_source(calib)
    if (loaded is not None or in_memory_data or tokenizer is not None) and (low_memory or nproc > 1 or under_torchrun()):
        raise QuantkitError("a loaded model, a given tokenizer or in-memory data run in one process; for --nproc, "
                            "torchrun or --low-memory give the model as a path or hub id and the data as a path")
    if output is None and (low_memory or nproc > 1 or under_torchrun()):
        raise QuantkitError("--nproc, torchrun and --low-memory export from their ranks; give an output directory")
    if loaded is not None and tokenizer is None:
        tokenizer = load_data_tokenizer(source_name(loaded), loaded)
    # before the model is loaded: minutes to hours of calibration must not end in a refused export
    info = preflight_calibration(
        None if loaded is not None else model_name, output, bits=spec.bits, fmt=fmt, act_order=spec.act_order,
        static_groups=spec.static_groups, overwrite=overwrite, calib=calib, calib_set=calib_set, seqlen=seqlen,
        device=device, devices=devices, nproc=nproc, offload_dir=offload_dir, low_memory=low_memory, resume=resume,
        model=loaded, tokenizer_given=tokenizer is not None, chat_template=chat_template, part=part,
        recipe=recipe, spec=spec, method=chosen, lm_head=lm_head, vision=vision,
    )
    if tokenizer is not None:
        from quantkit.models.checks import check_tokenizer_fits

        check_tokenizer_fits(tokenizer, loaded if loaded is not None else info.config)
    if low_memory:
        if not Path(model_name, "config.json").is_file():
            raise QuantkitError(f"--low-memory needs a local model directory with safetensors weights, got {model_name}")
        if (chosen.token_weights or smooth_uses_token_weights(spec.smooth)) and calib_set is None:
            what = chosen if chosen.token_weights else "--smooth tlq"
            raise QuantkitError(f"{what} with --low-memory needs token weights from a --calib-set (quantkit importance)")
    if nproc > 1 and under_torchrun():
        raise QuantkitError("--nproc spawns local ranks itself; under torchrun leave it at 1")
    job = CalibrationJob(
        model_name=source_name(model_name), output=output, spec=spec, method=chosen.name,
        calib=os.fspath(calib) if calib is not None and not in_memory_data else None, calib_set=calib_set,
        nsamples=nsamples, seqlen=seqlen, seed=seed, part=part, fmt=fmt, dtype=dtype, overwrite=overwrite,
        progress=progress, fp_target=fp_target, lm_head=lm_head, vision=vision, importance=importance,
        low_memory=low_memory, offload_dir=offload_dir, resume=resume, hooks=hooks, model=loaded,
        tokenizer=tokenizer, data=calib if in_memory_data else None, recipe=recipe,
        chat_template=None if chat_template is None else os.fspath(chat_template),
    )
    logger.info("calibrating %s: %s w%d g%d on %s, %d ranks%s", job.model_name, job.method, spec.bits,
                spec.group_size, job.calib or job.calib_set or "in-memory data", nproc,
                ", low memory" if low_memory else "")
    exporting = output is not None and (not under_torchrun() or int(os.environ["RANK"]) == 0)
    with contextlib.ExitStack() as scope:
        if low_memory and exporting:
            scope.enter_context(resumable_work(work_dir_for(output)))
            scope.enter_context(scratch_dir(offload_dir))
        outcome = _run_ranks(job, nproc, device, devices, dist_timeout)
    if low_memory and exporting:
        shutil.rmtree(work_dir_for(output), ignore_errors=True)
    if exporting:
        logger.info("exported %s to %s", fmt, output)
    return outcome


def source_name(model: str | os.PathLike | torch.nn.Module) -> str:
    """The name a model is reported under: its path or hub id, or where a loaded model came from."""
    if isinstance(model, torch.nn.Module):
        return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return os.fspath(model)


def check_format_holds(fmt: str, *, lm_head: bool, vision: bool) -> None:
    """Raise QuantkitError if format `fmt` cannot hold what is to be quantized beyond the decoder layers."""
    flag = "--quantize-lm-head" if lm_head else "--quantize-vision" if vision else None
    if flag and not format_for(fmt).holds_outside_layers:
        able = [format_for(n) for n in FORMATS if format_for(n).holds_outside_layers]
        named = [f.name if f.bits == SUPPORTED_BITS else f"{f.name} ({' or '.join(map(str, f.bits))} bits)" for f in able]
        raise QuantkitError(
            f"{flag} exports to {' or '.join(named)} only: {fmt} checkpoints describe quantized decoder layers only; "
            f"pass --format {able[0].name} or drop the flag"
        )


def _run_ranks(job: CalibrationJob, nproc: int, device: str, devices: list[int] | None,
               dist_timeout: float) -> Outcome:
    """calibrate_rank on spawned local ranks, as this torchrun rank, or in this process alone."""
    if nproc > 1:
        # private_tempdir: torch leaves a failed rank's pytorch-errorfile-*.pickle in the temp folder
        with private_tempdir(), tempfile.TemporaryDirectory(prefix="quantkit-report-") as tmp:
            report_path = Path(tmp) / "report.json"
            spawn_ranks(nproc, calibrate_rank, dict(job=job, report_path=str(report_path)), device=device,
                        devices=devices, timeout_s=dist_timeout)
            return Outcome(json.loads(report_path.read_text()))
    if under_torchrun():
        comm, mine = init_from_env(device, devices, dist_timeout)
        try:
            return Outcome(calibrate_rank(job, comm=comm, device=mine))
        finally:
            dist.destroy_process_group()
    outcome: list[Outcome] = []
    calibrate_rank(job, comm=None, device=device, keep=outcome)
    return outcome[0]


def _samples_and_weights(job: CalibrationJob, model: torch.nn.Module, device: str, rank: int) -> tuple[list[dict], object]:
    """The calibration samples, and the token weights where the method uses them (else None)."""
    uses_weights = method_for(job.method).token_weights or smooth_uses_token_weights(job.spec.smooth)
    if job.calib_set is not None:
        samples, set_weights = load_calibration_set(job.calib_set, job.model_name, model)
        return samples, set_weights if uses_weights else None
    if job.data is not None:
        tokenizer = job.tokenizer if job.tokenizer is not None else load_data_tokenizer(job.model_name, model)
        samples = memory_calibration(job.data, tokenizer, job.nsamples, job.seqlen, job.seed, job.part,
                                     chat_template=job.chat_template)
    else:
        samples = load_calibration(job.calib, job.model_name, is_vlm(model.config), job.nsamples, job.seqlen,
                                   job.seed, job.part, tokenizer_or_processor=job.tokenizer,
                                   chat_template=job.chat_template)
    if not uses_weights:
        return samples, None
    weights = tlq_token_weights(model, samples, device=device, progress=job.progress and rank == 0,
                                **(job.importance or {}))
    return samples, weights


def calibrate_rank(job: CalibrationJob, comm: Comm | None = None, device: str = "cpu",
                   report_path: str | None = None, keep: list | None = None) -> dict:
    """One rank's (or the only process's) whole job: load, draw samples, calibrate; rank 0 exports.
    `keep` (one process) receives the Outcome with the quantized model and its codes."""
    started = time.perf_counter()
    comm = comm or Comm()
    comm.hooks = job.hooks or comm.hooks
    rank = comm.rank
    if job.low_memory:
        # The skeleton holds no decoder layer: enough for the samples (a calibration set's check of the
        # model), not for token weights, which calibrate.run_calibration has refused without a set.
        skeleton, _, _ = build_skeleton(job.model_name, job.dtype)
        samples, token_weights = _samples_and_weights(job, skeleton, device, rank)
        del skeleton
        model, calibration = calibrate_streaming(
            job.model_name, samples, job.spec, work_dir_for(job.output), method=job.method, device=device,
            token_weights=token_weights, progress=job.progress, resume=job.resume, fingerprint=job.fingerprint(),
            offload_dir=job.offload_dir, dtype=job.dtype, fp_target=job.fp_target, lm_head=job.lm_head,
            vision=job.vision, comm=comm, recipe=job.recipe,
        )
    else:
        model = job.model if job.model is not None else load_model(job.model_name, dtype=job.dtype)
        samples, token_weights = _samples_and_weights(job, model, device, rank)
        calibration = calibrate_model(
            model, samples, job.spec, method=job.method, device=device, token_weights=token_weights,
            progress=job.progress, comm=comm, fp_target=job.fp_target, lm_head=job.lm_head, vision=job.vision,
            recipe=job.recipe,
        )
    report = job.finish_report(calibration.report, samples, started)
    if rank == 0 and job.output is not None:
        if job.low_memory:
            export_streamed(model, calibration.results, job.output, fmt=job.fmt, source=job.model_name, report=report,
                            overwrite=job.overwrite)
        else:
            # a given tokenizer or processor is saved with save_pretrained; else the one the source (the loaded
            # model's name_or_path included) builds
            source = job.model_name if job.model is None else getattr(job.model.config, "_name_or_path", "") or None
            save_quantized(model, calibration.results, job.output, fmt=job.fmt, report=report, overwrite=job.overwrite,
                           source=None if job.tokenizer is not None else source, processor=job.tokenizer)
    if rank == 0 and report_path is not None:
        Path(report_path).write_text(json.dumps(report))
    if keep is not None:
        keep.append(Outcome(report, model, dict(calibration.results)))
    return report


def work_dir_for(output: str) -> Path:
    """Where a low-memory run keeps its finished layers until the export: OUTPUT.partial beside it."""
    out = Path(output)
    return out.with_name(out.name + ".partial")


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice(list(METHODS)), default="gptq", show_default=True, help="Solver: round-to-nearest, GPTQ, or TLQ (importance-weighted GPTQ).")
@click.option("--bits", type=int, default=4, show_default=True, help=f"Weight bits, one of {SUPPORTED_BITS}.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Columns per quantization group; -1 for per-channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric grid (zero in the middle) or asymmetric (fitted zero point).")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="GPTQ desc_act: solve columns by decreasing Hessian diagonal.")
@click.option("--static-groups/--dynamic-groups", default=None, help="With --act-order: fix group grids before the column permutation (default), or fit each group as the solve reaches it (GPTQ g_idx; gptq formats only).")
@click.option("--cd-sweeps", type=int, default=0, show_default=True, help="Coordinate-descent sweeps over the GPTQ codes on the layer objective (never raises it).")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Dampening: fraction of the mean Hessian diagonal added to it.")
@click.option("--fp-target/--no-fp-target", default=None, help="Fit each linear to the FP model's output on the FP model's inputs (GPTAQ-style; one more FP layer pass per layer). Default: on for tlq, off for gptq.")
@importance_options
@click.option("--quantize-lm-head", "lm_head", is_flag=True, help="Quantize lm_head too (after the decoder layers; compressed-tensors or fake export).")
@click.option("--quantize-vision", "vision", is_flag=True, help="Quantize a VLM's vision tower and projector too (before the language model, plain Hessians; compressed-tensors or fake export).")
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False), default=None, help="A YAML quantization recipe: targets and ignore patterns, per-module overrides of bits, group size, sym, act-order and method (the flags above are its defaults; README \"Recipes\").")
@click.option("--mse", is_flag=True, help="Search a clipping ratio per group that minimises grid MSE.")
@click.option("--act-bits", type=click.Choice(["4", "8"]), default=None, help="Also quantize every quantized linear's input per token (dynamic, symmetric): W8A8 with --bits 8, W4A8 with --bits 4; needs --group-size -1 --sym.")
@click.option("--smooth", type=click.Choice((AUTO, *SMOOTH_MODES)), default=AUTO, show_default=True, help="Fold per-channel smoothing scales into norms and linears before the solve, alpha searched per fold on the layer error with uniform or TLQ token weights; auto: none for weight-only runs, with --act-bits tlq for --method tlq and uniform otherwise.")
@click.option("--calib", help="Calibration data: .txt/.jsonl file, glob, directory, hf:DATASET, a calib/ recipe (.yaml), or chat records ({\"messages\": [...]} JSONL).")
@click.option("--calib-set", type=click.Path(), help="A token-level calibration set made by `quantkit importance` (replaces --calib).")
@click.option("--chat-template", "chat_template", type=click.Path(dir_okay=False), default=None, help="A Jinja chat template file that renders --calib chat records ({\"messages\": [...]} JSONL) instead of the tokenizer's own template.")
@click.option("--part", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True, help="Part of each text file to draw from (held-out = last 10%).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence (the most tokens of an image-text or chat sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing calibration windows.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None, help="Export format (default: compressed-tensors, which plain transformers loads at every width and vLLM at 4 and 8 bits; gptq/gptq_v2 load with gptqmodel and in vLLM).")
@click.option("--device", default="cpu", show_default=True, help="Compute device for the current layer (cpu, cuda, cuda:1).")
@click.option("--nproc", type=int, default=1, show_default=True, help="Ranks to spawn locally (samples sharded, linears solved in parallel); gloo on CPU, NCCL on GPU.")
@click.option("--devices", help="Comma-separated GPU ids, one per rank (with --device cuda), e.g. 0,1,2.")
@click.option("--dist-timeout", type=float, default=600.0, show_default=True, help="Seconds a rank waits on the others before giving up.")
@click.option("--low-memory", is_flag=True, help="Stream one decoder layer at a time from the safetensors files; finished layers go to OUTPUT.partial.")
@click.option("--offload-dir", type=click.Path(), help="Keep the calibration activations on disk here (with --low-memory).")
@click.option("--resume", is_flag=True, help="Continue an interrupted --low-memory run from OUTPUT.partial (implies --low-memory).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True, help="Dtype to load the model in.")
@output_option(required=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", default=None, help="Upload the export (model card included) to this hub model repo, OWNER/NAME.")
@click.option("--private", is_flag=True, default=None, help="With --push-to-hub: create the repo private.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
def calibrate(model, method, bits, group_size, sym, act_order, static_groups, cd_sweeps, damp, fp_target, guidance, row_groups, importance_loss, fisher_draws, lam, power, lm_head, vision, mse, act_bits, smooth, calib, calib_set, chat_template, part, nsamples, seqlen, seed, fmt, device, nproc, devices, dist_timeout, low_memory, offload_dir, resume, dtype, output, overwrite, push_to_hub, private, as_json, recipe) -> None:
    """Quantize MODEL (a local directory or hub id) layer by layer and export it."""
    from quantkit.api import quantize

    try:
        device_ids = [int(d) for d in devices.split(",")] if devices else None
    except ValueError:
        raise QuantkitError(f"--devices must be comma-separated GPU ids such as 0,1,2, got {devices!r}") from None
    if device_ids and not device.startswith("cuda"):
        device = "cuda"
    importance = {"guidance": guidance, "row_groups": row_groups, "loss": importance_loss, "draws": fisher_draws,
                  "lam": lam, "power": power}
    quantized = quantize(
        model, data=calib, method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
        static_groups=static_groups, damp=damp, mse=mse, cd_sweeps=cd_sweeps, fp_target=fp_target,
        act_bits=None if act_bits is None else int(act_bits), smooth=smooth,
        nsamples=nsamples, seqlen=seqlen, seed=seed, part=part, output_dir=output, format=fmt, overwrite=overwrite,
        device=device, dtype=dtype, progress=not as_json, calib_set=calib_set, nproc=nproc, devices=device_ids,
        dist_timeout=dist_timeout, low_memory=low_memory, offload_dir=offload_dir, resume=resume, lm_head=lm_head,
        vision=vision, importance=importance, reload=False, push_to_hub=push_to_hub, private=private, recipe=recipe,
        chat_template=chat_template,
    )
    report = quantized.report
    pushed = {"hub_url": quantized.hub_url} if quantized.hub_url else {}
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "layers"} | {"output": output} | pushed))
    else:
        mixed = f" + recipe {recipe}" if recipe else ""
        click.echo(f"quantized {model} with {method} w{bits} g{group_size}{mixed} in {report['total_seconds']:.1f}s -> {output} ({report['format']})")
        if quantized.hub_url:
            click.echo(f"pushed to {quantized.hub_url}")
