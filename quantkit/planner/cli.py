"""`quantkit plan`: what `quantkit calibrate` with the same options will need, per rank, before anything loads."""

from __future__ import annotations

import copy
import importlib

import click

from quantkit.errors import QuantkitError
from quantkit.planner import parse_bytes
from quantkit.planner.report import available_host_bytes, device_bytes, emit

# calibrate's options that do not change what a run needs
_NOT_PLANNED = ("dry_run", "as_json", "push_to_hub", "private", "overwrite")


def _calibrate_command() -> click.Command:
    from quantkit.cli import SUBCOMMANDS

    module, attr, _ = SUBCOMMANDS["calibrate"]
    return getattr(importlib.import_module(module), attr)


def _plan_params() -> list[click.Parameter]:
    """calibrate's own options (a calibrate command line plans as it is; no output is needed) and the limits."""
    params = []
    for param in _calibrate_command().params:
        if param.name in _NOT_PLANNED:
            continue
        if param.required and isinstance(param, click.Option):
            param = copy.copy(param)
            param.required = False
        params.append(param)
    return params + [
        click.Option(["--gpu-mem"], default=None, help="Memory of each GPU, e.g. 24GiB (default: this machine's GPU with --device cuda)."),
        click.Option(["--host-mem"], default=None, help="Host memory the run may use, e.g. 256GiB (default: what this machine has available now)."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the plan as one JSON object (per-rank peak_device_bytes, peak_host_bytes)."),
    ]


def _plan(model: str, gpu_mem: str | None, host_mem: str | None, as_json: bool, **options) -> None:
    from quantkit.calibrate.budget import plan_job
    from quantkit.calibrate.cli import job_from_options
    from quantkit.calibrate.preflight import check_calib_set
    from quantkit.data.checks import check_data
    from quantkit.fsutil import check_offload_dir
    from quantkit.models.files import check_seqlen

    given_data = options.get("calib")
    # what calibrate needs to run but a plan does not: data and an output (neither is read here)
    if options.get("calib") is None and options.get("calib_set") is None:
        options["calib"] = "(no data: plan only)"
    given_output = options.get("output_dir")
    if given_output is None:
        options["output_dir"] = "(no output: plan only)"
    options.update(overwrite=False, push_to_hub=None, private=None)
    job = job_from_options(model, options, progress=False)
    # a plan of a run that calibrate would refuse is no plan: its data, template and set checked as calibrate does
    check_data(given_data, part=job.data.part, chat_template=job.data.chat_template)
    check_calib_set(job.data)
    check_offload_dir(job.run.offload_dir, [model, given_data, job.data.calib_set])
    config = _check_as_calibrate(job, model, given_data)
    plan = plan_job(job)
    if given_output is not None:
        _check_output(given_output, plan, [model, given_data, options.get("calib_set"), options.get("offload_dir")])
    device_limit = parse_bytes(gpu_mem) if gpu_mem is not None else device_bytes(plan.settings.device)
    if plan.settings.on_gpu and device_limit is None:
        raise QuantkitError("--device cuda on a machine without CUDA: give each GPU's memory with --gpu-mem, e.g. 24GiB")
    host_limit = parse_bytes(host_mem) if host_mem is not None else available_host_bytes()
    if config is not None:  # after read_shape's checks of the config and headers, and plan's own
        from quantkit.calibrate.preflight import check_against_model

        check_against_model(job, config)
    if given_data is not None and config is not None:  # last: after the model checks (calibrate's order) and plan's own
        check_seqlen(config, job.data.seqlen, recipe=job.data.recipe_of("seqlen"))
    emit(plan, device_limit, host_limit, as_json)


def _check_output(output: str, plan, sources: list) -> None:
    """A given -o as calibrate checks it (away from the inputs, writable), with room for what the plan writes there:
    a plan that says a run fits must not be one whose export the disk refuses. An existing -o passes as under
    --overwrite, which a plan cannot be given."""
    from quantkit.fsutil import check_output

    beside = sum(v for k, v in plan.disk.items() if k not in ("total", "offload"))  # --offload-dir's scratch goes elsewhere
    check_output(output, overwrite=True, sources=sources, need_bytes=beside)


def _check_as_calibrate(job, model: str, data: str | None):
    """calibrate's checks that read only config.json: a device kind calibrate runs on (a plan for CUDA is made
    on any machine), image data for a text model. Returns the config where it read one, else None (_plan then runs
    calibrate's own checks against the model the config builds: check_against_model)."""
    import torch
    from transformers import AutoConfig

    from quantkit.calibrate.preflight import check_vision_side
    from quantkit.data.calibration import check_source_for_model
    from quantkit.models import is_vlm

    try:
        kind = torch.device(job.run.device).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise QuantkitError(f"device {job.run.device!r} is not supported; use cpu, cuda or cuda:N")
    from quantkit.engine.distributed import check_device_ids

    check_device_ids(job.run.devices, job.run.nproc)
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception:  # noqa: BLE001 - read_shape says what is wrong with a config that does not load
        return None
    if job.quantization.vision:
        check_vision_side(config)
    if data is not None:
        check_source_for_model(data, is_vlm(config), model)
    return config


HELP = ("What `quantkit calibrate` with the same options needs per rank, on disk and in time, before it runs.\n\n"
        "Reads config.json and the safetensors headers only (no weights): per rank, the peak device and host "
        "memory and the terms that make it, disk for the export and --low-memory's work area, and the time from "
        "rates measured by benchmarks/bench_real_size.py. Exits 2 with one line naming the biggest term and what "
        "to change when the run does not fit.")
plan = click.Command("plan", params=_plan_params(), callback=_plan, help=HELP)
