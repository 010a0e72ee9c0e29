"""`quantkit calibrate`'s preflight: what a job's files allow, checked before the model loads and any sample is
drawn (build_job has checked the options already). The model's files are read once here and kept for loading."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.calibrate.job import CalibrationJob, QuantizationSpec
from quantkit.errors import QuantkitError
from quantkit.models.files import ModelFiles
from quantkit.quant.methods import DEFAULT_EXPERT_TOKENS

if TYPE_CHECKING:
    import torch


def check_calib_set(data) -> None:
    """A --calib-set's manifest reads and agrees with the job's data settings (calibrate's check, and plan's)."""
    if data.calib_set is not None:
        from quantkit.importance import read_manifest

        check_set_settings(data, read_manifest(data.calib_set))


def preflight(job: CalibrationJob) -> ModelFiles:
    """Everything `quantkit calibrate` (and quantkit.quantize) can check before it loads the model: the device, the
    data, a calibration set, the model's files (its tokenizer or processor where it reads the data), the windows'
    length, a recipe against the model's linears, and the output. Returns what was read of the model's files."""
    from quantkit.data.checks import check_chat_data, check_data, data_paths, model_for_data
    from quantkit.engine.distributed import check_device
    from quantkit.fsutil import check_offload_dir
    from quantkit.models.files import TOKENIZER_FILES, check_seqlen

    model, data, q, run = job.model, job.data, job.quantization, job.run
    check_device(run.device, run.devices, run.nproc)
    check_data(data.source, part=data.part, chat_template=data.chat_template)
    check_calib_set(data)
    check_offload_dir(run.offload_dir, [None if model.loaded is not None else model.name, data.calib_set,
                                        *data_paths(data.source)])
    if run.offload_dir is not None and job.export.output is not None:
        off, out = (Path(p).expanduser().resolve() for p in (run.offload_dir, job.export.output))
        if off == out or out in off.parents or off in out.parents:
            raise QuantkitError(f"--offload-dir {run.offload_dir} and -o {job.export.output} overlap: the export "
                                "would replace the scratch files, or they would land in the export; give them apart")
    given = model.tokenizer is not None
    if model.loaded is not None:
        from quantkit.models import adapter_for
        from quantkit.models.checks import (
            check_config_values,
            check_layer_dtypes,
            check_model_weights,
            check_not_quantized,
        )

        check_not_quantized(model.loaded, model.name)
        check_config_values(model.loaded.config, model.name)
        check_layer_dtypes(model.loaded, model.name)
        meta = next((n for n, p in model.loaded.named_parameters() if p.device.type == "meta"), None)
        if meta is not None:
            raise QuantkitError(f"{model.name}: parameter {meta} is on the meta device (shapes, no values); load the "
                                "model's weights (from_pretrained) before quantizing it")
        adapter_for(model.loaded)  # an unsupported architecture fails here, as for a model read from files
        check_model_weights(model.loaded)
        files = ModelFiles(name=model.name, local=None, config=model.loaded.config)
    else:
        drawn = data.source is not None or data.records is not None
        # The export copies the model's tokenizer: where it has one, it must load (an RTN run reads no data).
        exported = job.export.output is not None and any(Path(model.name, f).is_file() for f in TOKENIZER_FILES)
        from quantkit.data.calibration import holds_images

        records_hold_images = not given and data.records is not None and holds_images(data.records)
        files = model_for_data(model.name, None if given else data.source, tokenizer=(drawn or exported) and not given,
                               images=records_hold_images)
        if run.low_memory and files.weight_files:
            from quantkit.models.checks import check_weight_files

            check_weight_files(files.weight_files, model.name)  # streamed layers are never all in memory at once
    if q.vision:
        check_vision_side(files.config)
    if data.source is not None or data.records is not None:
        check_seqlen(files.config, data.seqlen, recipe=data.recipe_of("seqlen"))
    if data.source is not None:
        from quantkit.data.calibration import check_source_for_model
        from quantkit.models import is_vlm

        check_source_for_model(data.source, is_vlm(files.config), model.name)
    if model.loaded is None and not given:
        check_chat_data(data.source, data.chat_template, files)
    check_against_model(job, model.loaded if model.loaded is not None else files.config)
    if job.export.output is not None:
        _check_output(job, files, data_paths(data.source))
    if model.tokenizer is not None and hasattr(model.tokenizer, "image_processor"):
        from quantkit.data.checks import check_image_token

        check_image_token(model.tokenizer, files.config, model.name)
    if model.tokenizer is not None:
        from quantkit.models.checks import check_tokenizer_fits

        check_tokenizer_fits(model.tokenizer, model.loaded if model.loaded is not None else files.config)
    if run.low_memory and not Path(model.name, "config.json").is_file():
        raise QuantkitError(f"--low-memory needs a local model directory with safetensors weights, got {model.name}")
    return files


def check_set_settings(data: object, manifest: dict) -> None:
    """A --calib-set brings its own samples: a sample setting the job gives (nsamples and seqlen given at all, the
    others other than build_job's default) that differs from the set's is refused, not silently replaced by the set's."""
    from quantkit.calibrate.job import COUNTS, OPTIONS

    for name in ("nsamples", "seqlen", "seed", "part", "chat_template"):
        mine, theirs = getattr(data, name), manifest.get(name)
        given = name in data.given if name in COUNTS else mine != OPTIONS[name]
        if given and mine != theirs:
            flag = "--" + name.replace("_", "-")
            raise QuantkitError(f"{flag} {mine} does not apply to --calib-set {data.calib_set}, whose samples were drawn "
                                f"with {flag} {theirs}; drop {flag}, or make a set with it (quantkit importance "
                                f"{flag} {mine})")


def export_bytes(files: ModelFiles, bits: int, fmt: str) -> int:
    """A rough size of the exported checkpoint (0 when the weights are not local)."""
    from quantkit.export.formats import format_for

    if not files.weight_bytes:
        return 0
    if format_for(fmt).stores_dense_weights:
        return files.weight_bytes
    # packed codes plus scales, zeros and g_idx (a few percent at any group size)
    quantized = int(files.linear_numel * bits / 8 * 1.15)
    return max(0, files.weight_bytes - files.linear_bytes) + quantized


def _check_output(job: CalibrationJob, files: ModelFiles, data_paths: list[str]) -> None:
    from quantkit.fsutil import check_output, check_writable, work_dir_for

    output, run = job.export.output, job.run
    need = export_bytes(files, job.quantization.weights.bits, job.export.fmt)
    if run.low_memory and need:
        # the spool and the final files coexist in the output's temporary directory, beside OUTPUT.partial's codes
        need = 2 * need + (0 if run.resume and work_dir_for(output).is_dir() else files.linear_numel)
    sources = [None if job.model.loaded is not None else job.model.name, job.data.calib_set, run.offload_dir,
               job.data.chat_template, job.quantization.recipe_file, *data_paths]
    check_output(output, overwrite=job.export.overwrite, sources=sources, need_bytes=need)
    if run.low_memory and work_dir_for(output).is_dir():  # --resume adds layers there, a fresh run replaces it
        check_writable(work_dir_for(output), f"the work area {work_dir_for(output)}")


def _model_and_adapter(job: CalibrationJob, model_or_config: object) -> tuple[object, object]:
    from torch import nn

    from quantkit.models import adapter_for
    from quantkit.models.files import build_meta_model

    if isinstance(model_or_config, nn.Module):
        return model_or_config, adapter_for(model_or_config)
    return build_meta_model(model_or_config, job.model.name)  # shapes only: no weights are read


def check_against_model(job: CalibrationJob, model_or_config: object) -> None:
    """Every check of the job against the model's modules (a loaded model, or the one its config builds on the meta
    device): the engine's own (check_before_work: group widths, recipe, experts, lm_head, vision side), --expert-tokens'
    experts, and that the format stores each linear the run quantizes and transformers loads the export. calibrate's
    preflight, its --dry-run and `quantkit plan` all call this one function, so none promises what another refuses."""
    q = job.quantization
    model, adapter = _model_and_adapter(job, model_or_config)
    if q.method.expert_tokens != DEFAULT_EXPERT_TOKENS:
        check_has_experts(job, model, adapter)
    bits = check_recipe(job, model, adapter) if q.recipe is not None else None
    check_before_work(model, q)
    if job.export.output is not None:
        from quantkit.engine.checks import candidate_linears

        if bits is None:
            bits = dict.fromkeys(candidate_linears(model, adapter, lm_head=q.lm_head, vision=q.vision), q.weights.bits)
        check_linear_shapes(job, model, bits)
        check_export_dtype(job, model_or_config)


def check_export_dtype(job: CalibrationJob, model_or_config: object) -> None:
    """The model runs (and is exported) in a float dtype an export holds: float32, float16 or bfloat16. A config.json
    saying float64 was loaded as such under --dtype auto, and the export then said float64, which load_quantized
    refuses as damaged (quantkit's own export)."""
    import torch

    from quantkit.export.reader import FLOAT_DTYPES

    if isinstance(model_or_config, torch.nn.Module):
        dtype = next((p.dtype for p in model_or_config.parameters() if p.is_floating_point()), None)
        where, fix = "its weights", "convert it first (model.float())"
    elif job.model.dtype == "auto":
        dtype = getattr(model_or_config, "dtype", None) or getattr(model_or_config, "torch_dtype", None)
        where, fix = "config.json's dtype, which --dtype auto keeps", "pass --dtype float32 (dtype='float32')"
    else:
        return
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    if name not in FLOAT_DTYPES:
        raise QuantkitError(f"{job.model.name} runs in {name} ({where}), which no export holds "
                            f"({', '.join(FLOAT_DTYPES)}); {fix}")


def check_before_work(model: torch.nn.Module, quantization: QuantizationSpec) -> None:
    """The engine's checks of a model (loaded, or built on the meta device) against the quantization (settings,
    recipe, group widths, finite weights where it has them), with no forward."""
    from quantkit.engine.checks import check_model
    from quantkit.engine.plan import LinearPlan
    from quantkit.models import adapter_for

    plan = LinearPlan(quantization.weights, quantization.method, quantization.recipe)
    check_model(model, adapter_for(model), plan, quantization.lm_head, quantization.vision)


def check_has_experts(job: CalibrationJob, model: torch.nn.Module, adapter: Any) -> None:
    """--expert-tokens changes the statistics of a mixture of experts only: a model without one is refused."""
    if not any(adapter.layout(i).experts for i in range(len(adapter.decoder_layers(model)))):
        raise QuantkitError(f"--expert-tokens (expert_tokens=) has no effect on {job.model.name}: its "
                            f"{getattr(model.config, 'model_type', type(model).__name__)} layers have no mixture of "
                            "experts; drop it")


def check_linear_shapes(job: CalibrationJob, model: torch.nn.Module, bits: dict[str, int]) -> None:
    """Every linear the run quantizes (name -> bits) has a shape the export format stores at its bits (GPTQ's whole
    int32 words at 3 bits), is a kind of linear the format holds, and its family loads the format in transformers:
    before any calibration rather than at the export."""
    from quantkit.export.formats import format_for
    from quantkit.models import get_module
    from quantkit.models.conv1d import TransposedLinear

    fmt = format_for(job.export.fmt)
    for name, width_bits in bits.items():
        linear = get_module(model, name)
        fmt.check_linear(name, linear.out_features, linear.in_features, width_bits)
        if isinstance(linear, TransposedLinear):
            fmt.check_conv1d(name)
    q = job.quantization
    if fmt.holds_activation_bits:
        fmt = fmt.with_act_bits(q.weights.act_bits)  # its 8-bit weights then stay unpacked
    fmt.check_family(lambda: model, bits)


def check_recipe(job: CalibrationJob, model: torch.nn.Module, adapter: Any) -> dict[str, int]:
    """The job's recipe fits the model (every pattern matches a linear, every group size divides its linears' widths,
    its methods need no statistics the run does not gather) and the format stores every setting it gives. Returns
    the bits of each linear the recipe quantizes."""
    from quantkit.engine.checks import candidate_linears, model_linears
    from quantkit.export.formats import format_for
    from quantkit.models import get_module

    q = job.quantization
    chosen = q.recipe.check(candidate_linears(model, adapter, lm_head=q.lm_head, vision=q.vision), q.weights,
                            q.method, model_linears(model), fp_target=q.fp_target)
    if q.lm_head and adapter.lm_head not in chosen:
        raise QuantkitError(f"--quantize-lm-head (lm_head=True) quantizes {adapter.lm_head}, and the recipe leaves it in "
                            "full precision (its ignore or targets); drop one of the two")
    fmt = format_for(job.export.fmt)
    for settings in set(chosen.values()):
        try:
            fmt.check_options(settings.spec.bits, settings.spec.act_order, settings.spec.static_groups)
        except QuantkitError as err:
            name = next(n for n, s in chosen.items() if s == settings)
            raise QuantkitError(f"recipe, for {name}: {err}") from None
    for name, settings in chosen.items():
        linear = get_module(model, name)
        fmt.check_linear(name, linear.out_features, linear.in_features, settings.spec.bits)
    return {name: settings.spec.bits for name, settings in chosen.items()}


def check_vision_side(config: Any) -> None:
    """Refuse --quantize-vision for a model without a vision side."""
    from quantkit.models import is_vlm

    if not is_vlm(config):
        raise QuantkitError(f"{config.model_type} models have no vision side to quantize; drop --quantize-vision")
