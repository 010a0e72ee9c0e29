"""What a CalibrationJob will need (quantkit.planner), checked before the model loads; --dry-run prints it."""

from __future__ import annotations

import logging

from quantkit.calibrate.job import CalibrationJob
from quantkit.errors import QuantkitError
from quantkit.planner import Plan, RunSettings, check_plan, human, plan_run
from quantkit.planner.report import available_host_bytes, device_bytes
from quantkit.planner.shape import read_shape, shape_of

logger = logging.getLogger(__name__)

# The planner's peaks are within 20% of the measured ones (tests/test_planner.py): a run is refused before it
# loads only when even 20% less than the plan would not fit, and warned about when the plan alone does not.
MARGIN = 1.25


def settings_for(job: CalibrationJob) -> RunSettings:
    """The planner's view of a job."""
    q, run, data = job.quantization, job.run, job.data
    return RunSettings(
        method=str(q.method), hessians=q.method.needs_activations, token_weights=q.token_weights,
        fp_target=q.fp_target, nsamples=data.nsamples, seqlen=data.seqlen, nproc=run.nproc, device=run.device,
        low_memory=run.low_memory, offload_dir=run.offload_dir is not None, calib_set=data.calib_set is not None,
        bits=q.weights.bits, group_size=q.weights.group_size, fmt=job.export.fmt or None, recipe=q.recipe,
    )


def plan_job(job: CalibrationJob) -> Plan:
    """The plan of a job, from config.json and the safetensors headers (or from a loaded model's modules)."""
    if job.model.loaded is not None:
        shape = shape_of(job.model.loaded, job.model.name)
    else:
        shape = read_shape(job.model.name, job.model.dtype)
    return plan_run(shape, settings_for(job))


def limits(plan: Plan) -> tuple[int | None, int | None]:
    """(memory of one GPU of the run, host memory the run may take) on this machine; None where unknown."""
    device_limit = device_bytes(plan.settings.device)
    host = available_host_bytes()
    if host is not None and plan.settings.nproc == 1:
        from quantkit.memory import current_rss_mb

        host += int((current_rss_mb() or 0) * 2**20)  # this process is the run: what it holds counts as its own
    return device_limit, host


def check_memory(job: CalibrationJob) -> Plan | None:
    """Refuse (QuantkitError, one line) a job that will not fit this machine's memory before anything loads;
    warn when it may not. None where the model cannot be planned (an architecture the planner does not know
    yet fails later, where it always did)."""
    from quantkit.engine.distributed import under_torchrun

    try:
        plan = plan_job(job)
    except QuantkitError as err:
        logger.debug("no memory plan: %s", err)
        return None
    device_limit, host_limit = limits(plan)
    if under_torchrun():
        host_limit = None  # other nodes' ranks share other hosts: this process sees only its own
    generous = (None if device_limit is None else int(device_limit * MARGIN),
                None if host_limit is None else int(host_limit * MARGIN))
    check_plan(plan, *generous)
    try:
        check_plan(plan, device_limit, host_limit)
    except QuantkitError as err:
        logger.warning("%s (the plan is within 20%% of the run: going ahead)", err)
    logger.debug("memory plan: device %s, host %s", human(plan.peak_device_bytes), human(plan.peak_host_bytes))
    return plan
