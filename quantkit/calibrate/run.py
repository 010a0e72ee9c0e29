"""Running a CalibrationJob: the preflight, the ranks, each rank's load -> samples -> calibrate -> export.

calibrate_loaded is the one in-memory entry (a loaded model and its samples in, the quantized model and its
codes out) that every command calibrating in-process goes through: `quantkit calibrate`, quantkit.quantize,
`quantkit qid measure` and the demo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from quantkit.calibrate.job import CalibrationJob, DataSpec, ExportSpec, QuantizationSpec
from quantkit.engine.comm import Comm
from quantkit.engine.distributed import init_from_env, spawn_ranks, under_torchrun
from quantkit.quant.spec import QuantSpec

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a calibration run gives back: the report and, when it ran in this process, the quantized model
    (dequantized weights in place) and its exact codes per linear; where the export went, and the hub URL."""

    report: dict
    model: torch.nn.Module | None = None
    results: dict | None = None
    output_dir: str | None = None
    hub_url: str | None = None


def run_job(job: CalibrationJob) -> Outcome:
    """Check the job's files, calibrate in this process, on spawned ranks or as this torchrun rank, export
    (and push to the hub); the one path of `quantkit calibrate` and quantkit.quantize."""
    from quantkit.engine.autocast import autocast_off, model_devices
    from quantkit.fsutil import work_dir_for

    with contextlib.ExitStack() as scope:
        # the caller's autocast would reach every calibration forward (the result must be the call's outside it)
        scope.enter_context(autocast_off([job.run.device, *(job.run.devices or ()), *model_devices(job.model.loaded)]))
        export = job.export
        if export.push_to_hub is not None and export.output is None:
            tmp = scope.enter_context(tempfile.TemporaryDirectory(prefix="quantkit-push-"))
            job = replace(job, export=replace(export, output=str(Path(tmp) / "export")))
        outcome = _calibrate(job, scope)
        if export.push_to_hub is not None:
            from quantkit.export.hub import push_export

            outcome.hub_url = push_export(job.export.output, export.push_to_hub, private=export.private)
        outcome.output_dir = export.output  # None again where the export went to a temporary directory
        if job.run.low_memory and export.output is not None:
            shutil.rmtree(work_dir_for(export.output), ignore_errors=True)  # while this run still holds it
    return outcome


def _calibrate(job: CalibrationJob, scope: contextlib.ExitStack) -> Outcome:
    from quantkit.calibrate.preflight import preflight
    from quantkit.engine.streaming import locked_work_area, resume_note
    from quantkit.fsutil import kept_on_failure, scratch_dir, work_dir_for

    # before the model is loaded: minutes to hours of calibration must not end in a refused export
    files = preflight(job)
    job = replace(job, model=replace(job.model, files=files))  # read once: the loading reuses it
    from quantkit.calibrate.budget import check_memory

    check_memory(job)  # a run that cannot fit stops here, not at layer 40
    run, output = job.run, job.export.output
    q = job.quantization
    logger.info("calibrating %s: %s w%d g%d on %s, %d ranks%s", job.model.name, q.method, q.weights.bits,
                q.weights.group_size, job.data.source or job.data.calib_set or "in-memory data", run.nproc,
                ", low memory" if run.low_memory else "")
    exporting = output is not None and (not under_torchrun() or int(os.environ["RANK"]) == 0)
    if run.low_memory and exporting:
        # the lock first: a run refused by it touches nothing; kept_on_failure removes the work area (unless a
        # failure leaves layers to resume) while the lock still holds it
        scope.enter_context(locked_work_area(work_dir_for(output)))
        scope.enter_context(kept_on_failure(work_dir_for(output), resume_note))
        scope.enter_context(scratch_dir(run.offload_dir))
    outcome = _run_ranks(job)
    if exporting:
        logger.info("exported %s to %s", job.export.fmt, output)
    return outcome


def _run_ranks(job: CalibrationJob) -> Outcome:
    """calibrate_rank on spawned local ranks, as this torchrun rank, or in this process alone."""
    run = job.run
    devices = None if run.devices is None else list(run.devices)
    if run.nproc > 1:
        from quantkit.fsutil import private_tempdir

        # private_tempdir: torch leaves a failed rank's pytorch-errorfile-*.pickle in the temp folder
        with private_tempdir(), tempfile.TemporaryDirectory(prefix="quantkit-report-") as tmp:
            report_path = Path(tmp) / "report.json"
            spawn_ranks(run.nproc, calibrate_rank, dict(job=job, report_path=str(report_path)), device=run.device,
                        devices=devices, timeout_s=run.dist_timeout)
            return Outcome(json.loads(report_path.read_text()))
    if under_torchrun():
        comm, mine = init_from_env(run.device, devices, run.dist_timeout)
        try:
            return Outcome(calibrate_rank(job, comm=comm, device=mine))
        finally:
            dist.destroy_process_group()
    outcome: list[Outcome] = []
    calibrate_rank(job, comm=None, device=run.device, keep=outcome)
    return outcome[0]


def draw_samples(data: DataSpec, model_name: str, model: torch.nn.Module, tokenizer: Any = None) -> tuple[list[dict], Any]:
    """The calibration samples of `data` for `model`, and a calibration set's token weights (else None).

    `model` may be a skeleton without decoder layers (a calibration set checks it against the set's model);
    `tokenizer` is a given tokenizer or processor, else the one saved with `model_name`."""
    from quantkit.data.calibration import load_calibration, load_data_tokenizer, memory_calibration
    from quantkit.models import is_vlm

    if data.empty:
        return [], None  # a method that reads no activations (build_job refused the others without data)
    if data.calib_set is not None:
        from quantkit.importance import load_calibration_set

        return load_calibration_set(data.calib_set, model_name, model)
    if data.records is not None:
        tokenizer = tokenizer if tokenizer is not None else load_data_tokenizer(model_name, model)
        return memory_calibration(data.records, tokenizer, data.nsamples, data.seqlen, data.seed, data.part,
                                  chat_template=data.chat_template), None
    return load_calibration(data.source, model_name, is_vlm(model.config), data.nsamples, data.seqlen, data.seed,
                            data.part, tokenizer_or_processor=tokenizer, chat_template=data.chat_template), None


def token_weights_for(quantization: QuantizationSpec, model: torch.nn.Module, samples: list[dict], *,
                      device: str = "cpu", progress: bool = True, **streamed: Any) -> Any:
    """TLQ's token weights of `samples` under the FP `model` where the method or its smoothing reads them, else None.
    `streamed` (offload_dir, layers_from) runs the pass on a --low-memory skeleton (quantkit.importance.layers)."""
    if not quantization.token_weights:
        return None
    from quantkit.importance import tlq_token_weights

    return tlq_token_weights(model, samples, device=device, progress=progress, **streamed,
                             **(quantization.importance or {}))


def calibrate_loaded(model: torch.nn.Module, samples: list[dict], quantization: QuantizationSpec, *,
                     device: str = "cpu", progress: bool = True, comm: Comm | None = None,
                     token_weights: Any = None) -> Outcome:
    """Quantize a loaded `model` in place on `samples`: TLQ's token weights where the quantization reads them
    (unless given), the layer-wise engine, and the quantized linears' inputs quantized as calibrated (act_bits).
    The Outcome holds the model, its exact codes and the engine's report."""
    from quantkit.engine import calibrate_model

    comm = comm or Comm()
    training = model.training
    model.eval()  # calibration statistics without dropout (a model given in train mode gets it back)
    try:
        if not quantization.token_weights:
            token_weights = None  # a calibration set's weights, unused by this method
        elif token_weights is None:
            from quantkit.calibrate.preflight import check_before_work

            check_before_work(model, quantization)  # the gradient pass must not come before a refusal
            token_weights = token_weights_for(quantization, model, samples, device=device,
                                              progress=progress and comm.rank == 0)
        calibration = calibrate_model(
            model, samples, quantization.weights, method=quantization.method, device=device,
            token_weights=token_weights, progress=progress, comm=comm, fp_target=quantization.fp_target,
            lm_head=quantization.lm_head, vision=quantization.vision, recipe=quantization.recipe,
        )
    finally:
        model.train(training)
    from quantkit.models.checks import QUANTIZED_MARK

    setattr(model, QUANTIZED_MARK, f"in place, {quantization.method} w{quantization.weights.bits}")
    results = dict(calibration.results)
    if quantization.weights.act_bits is not None and results:
        from quantkit.quant.activations import quantize_model_activations

        # the model comes back as it was calibrated and as the export runs: its quantized linears' inputs quantized
        quantize_model_activations(model, sorted(results), quantization.weights.act_bits)
    return Outcome(calibration.report, model, results)


def export_loaded(outcome: Outcome, export: ExportSpec, spec: QuantSpec, *, source: str | None,
                  processor: Any = None) -> Path:
    """Write a calibrate_loaded outcome (solved with `spec`) to export.output in export.fmt, with `processor` (a
    tokenizer or processor) saved by its own save_pretrained, else the files `source` (a model directory or hub
    id) builds."""
    from quantkit.export import save_quantized

    return save_quantized(outcome.model, outcome.results, export.output, fmt=export.fmt, spec=spec,
                          report=outcome.report, overwrite=export.overwrite,
                          source=None if processor is not None else source, processor=processor)


def checked_tokenizer(job: CalibrationJob) -> Any:
    """The tokenizer (or processor) the preflight loaded from the model's files, in this process; else None."""
    return None if job.model.files is None else job.model.files.tokenizer


def calibrate_rank(job: CalibrationJob, comm: Comm | None = None, device: str = "cpu",
                   report_path: str | None = None, keep: list | None = None) -> dict:
    """One rank's (or the only process's) whole job: load, draw samples, calibrate; rank 0 exports.
    `keep` (one process) receives the Outcome with the quantized model and its codes."""
    from quantkit.fsutil import work_dir_for

    started = time.perf_counter()
    comm = comm or Comm()
    comm.hooks = job.run.hooks or comm.hooks
    progress = job.run.progress
    if job.run.low_memory:
        from quantkit.engine.plan import LinearPlan
        from quantkit.engine.streaming import StreamedLayers, calibrate_streaming
        from quantkit.export.streamed import export_streamed
        from quantkit.importance.layers import FileLayers
        from quantkit.models.streamed import build_skeleton

        # The skeleton holds no decoder layer: the gradient pass reads them from the files (FileLayers)
        skeleton, adapter, source = build_skeleton(job.model.name, job.model.dtype, files=job.model.files)
        samples, weights = draw_samples(job.data, job.model.name, skeleton, checked_tokenizer(job))
        q = job.quantization
        store = StreamedLayers(skeleton, adapter, source, work_dir_for(job.export.output),
                               LinearPlan(q.weights, q.method, q.recipe), comm, resume=job.run.resume,
                               fingerprint=job.fingerprint(progress and comm.rank == 0), offload_dir=job.run.offload_dir, dtype=job.model.dtype)
        if q.token_weights and weights is None:
            from quantkit.calibrate.preflight import check_before_work

            check_before_work(skeleton, q)  # as in memory: no gradient pass before a refusal (weights: on load)
            store.check_resume()  # and a --resume the work area refuses is refused before it
            # every rank runs the whole pass on every sample, as in memory (calibrate_loaded): the same weights; a
            # resumed run recomputes them (the fingerprint holds their settings), the pass being deterministic
            weights = token_weights_for(q, skeleton, samples, device=device, progress=progress and comm.rank == 0,
                                        offload_dir=job.run.offload_dir,
                                        layers_from=FileLayers(skeleton, adapter, source, device, job.model.dtype))
        model, calibration = calibrate_streaming(
            store, samples, device, weights if q.token_weights else None, progress, fp_target=q.fp_target,
            lm_head=q.lm_head, vision=q.vision,
        )
        report = job.finish_report(calibration.report, samples, started)
        if comm.rank == 0 and job.export.output is not None:
            export_streamed(model, calibration.results, job.export.output, fmt=job.export.fmt, spec=q.weights,
                            source=job.model.name, report=report, overwrite=job.export.overwrite)
        outcome = Outcome(report, model, dict(calibration.results))
    else:
        from quantkit.models import load_model

        model = job.model.loaded
        if model is None:
            config = None if job.model.files is None else job.model.files.config
            model = load_model(job.model.name, dtype=job.model.dtype, config=config)
        given = job.model.tokenizer
        samples, weights = draw_samples(job.data, job.model.name, model,
                                        given if given is not None else checked_tokenizer(job))
        outcome = calibrate_loaded(model, samples, job.quantization, device=device, progress=progress, comm=comm,
                                   token_weights=weights)
        outcome.report = job.finish_report(outcome.report, samples, started)
        if comm.rank == 0 and job.export.output is not None:
            # a given tokenizer or processor is saved with save_pretrained; else the one the source (the loaded
            # model's name_or_path included) builds
            source = job.model.name if job.model.loaded is None else getattr(model.config, "_name_or_path", "") or None
            export_loaded(outcome, job.export, job.quantization.weights, source=source, processor=job.model.tokenizer)
    if comm.rank == 0 and report_path is not None:
        Path(report_path).write_text(json.dumps(outcome.report))
    if keep is not None:
        keep.append(outcome)
    return outcome.report
