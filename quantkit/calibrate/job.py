"""What one calibration run does: a CalibrationJob of five small specs (model, data, quantization, run,
export), built once by build_job, for `quantkit calibrate` and quantkit.quantize alike, and passed down whole.

build_job checks everything that needs no file: each option on its own and the options together; the one file it
reads is a --calib recipe, for its own nsamples and seqlen where no option gives them (DataSpec.drawing).
quantkit.calibrate.preflight then checks the files before the model loads.
"""

from __future__ import annotations

import os
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from quantkit.calibrate.arguments import IMPORTANCE_FLAG_OF, check_arguments
from quantkit.data.recipes import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, is_recipe, sample_counts
from quantkit.errors import QuantkitError
from quantkit.quant.methods import (
    DEFAULT_EXPERT_TOKENS,
    DEFAULT_FP_TARGET,
    DEFAULT_METHOD,
    METHOD_OPTIONS,
    METHODS,
    Method,
    default_method,
    method_for,
)
from quantkit.quant.recipe import Recipe, as_recipe
from quantkit.quant.smooth import AUTO, resolve_smooth
from quantkit.quant.spec import QuantSpec

COUNTS = ("nsamples", "seqlen")  # how many samples of how many tokens: None (not given) means the data's own


@dataclass(frozen=True)
class ModelSpec:
    """Which model: a local directory or hub id, or a loaded model (in-process runs only)."""

    name: str  # the path or hub id, or where a loaded model came from (its name_or_path)
    dtype: str = "auto"  # the dtype it is loaded in
    loaded: Any = field(default=None, repr=False, compare=False)  # a loaded PreTrainedModel, quantized in place
    tokenizer: Any = field(default=None, repr=False, compare=False)  # a given tokenizer or processor
    files: Any = field(default=None, repr=False, compare=False)  # what the preflight read (models.files.ModelFiles)


@dataclass(frozen=True)
class DataSpec:
    """Which calibration samples: a source spec (files, hf:, a calib/ recipe), in-memory records or a
    token-level calibration set, and how many of what length are drawn."""

    source: str | None = None  # --calib: a path or source spec (quantkit.data)
    calib_set: str | None = None  # a set made by `quantkit importance` (its samples and token weights)
    records: Any = field(default=None, repr=False, compare=False)  # in-memory data (quantkit.data.calibration)
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN  # tokens per window (the most tokens of an image-text or chat sample)
    seed: int = 0
    part: str = "all"  # all, train (first 90% of each file) or heldout (last 10%)
    chat_template: str | None = None  # a Jinja file rendering chat records instead of the tokenizer's template
    given: tuple[str, ...] = COUNTS  # which of nsamples and seqlen the caller gave (drawing: the others are the data's)

    @classmethod
    def drawing(cls, nsamples: int | None = None, seqlen: int | None = None, **settings: Any) -> DataSpec:
        """The DataSpec of `settings` drawing `nsamples` samples of `seqlen` tokens, each the data's own where it is
        None: a recipe's (quantkit.data.recipes.sample_counts) or a --calib-set's, else the default."""
        try:
            counts = sample_counts(settings.get("source"), nsamples, seqlen)
        except QuantkitError as err:
            raise QuantkitError(f"--calib: {err}") from None  # as check_data says it of a recipe that does not load
        given = {name: value for name, value in (("nsamples", nsamples), ("seqlen", seqlen)) if value is not None}
        if settings.get("calib_set") is not None:  # its samples are drawn already: what the plan must be of
            from quantkit.importance.calibration_set import set_counts

            counts |= {name: value for name, value in set_counts(settings["calib_set"]).items() if name not in given}
        return cls(**settings, **counts, given=tuple(given))

    def recipe_of(self, count: str) -> str | None:
        """The recipe whose own `count` (nsamples or seqlen) is drawn with, no option having given it; else None."""
        return self.source if count not in self.given and is_recipe(self.source) else None

    @property
    def empty(self) -> bool:
        """No data given: only a method that reads no activations (RTN) runs without samples."""
        return self.source is None and self.calib_set is None and self.records is None

    def describe(self) -> str | None:
        """How the report names the data."""
        if self.records is not None:
            return f"in-memory {type(self.records).__name__} of {len(self.records)} items"
        return self.source


@dataclass(frozen=True)
class QuantizationSpec:
    """What is quantized and how: the solver's settings, the method, and where it applies."""

    weights: QuantSpec = field(default_factory=QuantSpec)
    method: Method = field(default_factory=lambda: method_for(DEFAULT_METHOD))
    fp_target: bool = False  # fit each linear to the FP model's output (GPTAQ-style)
    lm_head: bool = False  # quantize the output head too
    vision: bool = False  # quantize a VLM's vision tower and projector too
    recipe: Recipe | None = None  # which linears, and per-module settings (quantkit.quant.recipe)
    recipe_file: str | None = None  # the YAML the recipe was read from (an input the output must not hold)
    importance: dict | None = None  # TLQ's gradient-pass settings, resolved (quantkit.importance.resolve_importance)

    @property
    def token_weights(self) -> bool:
        """Whether the run reads TLQ's token weights (for its solve or its pre-solve step)."""
        return self.method.reads_token_weights


@dataclass(frozen=True)
class RunSpec:
    """Where and how the work runs: devices, ranks, memory, progress."""

    device: str = "cpu"
    nproc: int = 1  # local ranks spawned (gloo on CPU, NCCL on GPU)
    devices: tuple[int, ...] | None = None  # a GPU id per rank
    dist_timeout: float = 600.0  # seconds a rank waits on the others
    low_memory: bool = False  # decoder layers streamed from the files, finished ones kept in OUTPUT.partial
    offload_dir: str | None = None  # calibration activations on disk (only with low_memory)
    resume: bool = False  # continue an interrupted low-memory run
    progress: bool = True
    hooks: Any = field(default=None, compare=False)  # what tests change on every rank (quantkit.engine.comm.Hooks)

    @property
    def in_processes(self) -> bool:
        """Whether the work runs in other processes (ranks) or streams from the files: in-memory inputs cannot."""
        from quantkit.engine.distributed import under_torchrun

        return self.low_memory or self.nproc > 1 or under_torchrun()


@dataclass(frozen=True)
class ExportSpec:
    """Where the quantized model goes: an output directory in a format, and optionally the hub."""

    output: str | None = None  # None: nothing is written (in-process runs)
    fmt: str = ""  # an export format (quantkit.export.formats); build_job fills in the default
    overwrite: bool = False
    push_to_hub: str | None = None  # OWNER/NAME
    private: bool | None = None


@dataclass(frozen=True)
class CalibrationJob:
    """One calibration run, whichever way it runs (one process, ranks, low memory)."""

    model: ModelSpec
    data: DataSpec
    quantization: QuantizationSpec
    run: RunSpec = field(default_factory=RunSpec)
    export: ExportSpec = field(default_factory=ExportSpec)

    def finish_report(self, report: dict, samples: list[dict], started: float) -> dict:
        """The engine's report with the job's settings and the total time added."""
        return dict(report, model=self.model.name, calib=self.data.describe(), calib_set=self.data.calib_set,
                    part=None if self.data.calib_set is not None or self.data.empty else self.data.part,
                    seqlen=max((int(s["input_ids"].shape[-1]) for s in samples), default=None), nsamples=len(samples),
                    seed=None if self.data.empty else self.data.seed, format=self.export.fmt, total_seconds=round(time.perf_counter() - started, 3))

    def fingerprint(self, progress: bool = False) -> dict:
        """What a resumed low-memory run must share with the interrupted one (`progress`: a bar over the bytes
        hashed, which for a large model's weights take minutes)."""
        q, d = self.quantization, self.data
        return {"model": str(Path(self.model.name).resolve()), "method": q.method.name, "spec": q.weights.to_dict(),
                "presolve": q.method.presolve.to_dict(),
                "calib": d.source, "calib_set": d.calib_set, "nsamples": d.nsamples, "seqlen": d.seqlen,
                "seed": d.seed, "part": d.part, "dtype": self.model.dtype, "fp_target": q.fp_target,
                "lm_head": q.lm_head, "vision": q.vision, "expert_tokens": q.method.expert_tokens, "chat_template": d.chat_template,
                # the gradient pass's settings: a resumed run recomputes the token weights with the same ones
                **({"importance": q.importance} if q.importance is not None else {}),
                **({"recipe": q.recipe.to_dict()} if q.recipe is not None else {}), "files": self._file_digests(progress)}

    def _file_digests(self, progress: bool) -> dict[str, list[list]]:
        """[path, size, SHA-256] of the model's weights and config and of the data's files (a calibration set's
        too), by role: a resume over edited weights or text would join layers solved from two different inputs.
        The bytes, not the modification time: a byte-identical copy put back (a restore, a sync) is the same input."""
        from tqdm.auto import tqdm

        from quantkit.data.checks import data_paths
        from quantkit.fsutil import file_sha256

        model = Path(self.model.name)
        files: dict[str, list[Path]] = {
            "model": sorted(model.glob("*.safetensors")) + sorted(model.glob("*.json")) if model.is_dir() else [],
            "data": []}
        for source in [*data_paths(self.data.source), *([self.data.calib_set] if self.data.calib_set else [])]:
            root = Path(source)
            files["data"] += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        files = {role: [p for p in paths if p.is_file()] for role, paths in files.items()}
        total = sum(p.stat().st_size for paths in files.values() for p in paths)
        with tqdm(total=total, desc="hashing the inputs (for --resume)", unit="B", unit_scale=True, unit_divisor=1024,
                  disable=not progress, leave=False) as bar:
            return {role: [[str(p.resolve()), p.stat().st_size, file_sha256(p, bar.update)] for p in paths]
                    for role, paths in files.items()}


def _defaults(cls: type, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The simple defaults of a spec's fields (the one place the CLI's and the API's defaults come from)."""
    return {f.name: f.default for f in fields(cls) if f.name not in skip and f.default is not MISSING}


# build_job's options under their Python names, with their defaults: each spec's fields, renamed where the
# Python name reads better (output_dir, format), plus the weight settings of QuantSpec and the method.
WEIGHT_OPTIONS = ("bits", "group_size", "sym", "act_order", "static_groups", "damp", "mse", "cd_sweeps", "act_bits")
OPTIONS: dict[str, Any] = {
    "method": None,  # None: DEFAULT_METHOD (quantkit.quant.methods)
    **{name: getattr(QuantSpec, name) for name in WEIGHT_OPTIONS},
    "static_groups": None,  # None: with act_order
    "smooth": AUTO,
    "fp_target": None,  # None: the method's default
    "lm_head": False, "vision": False, "recipe": None, "importance": None, "expert_tokens": None,
    "dtype": ModelSpec.dtype,
    **_defaults(DataSpec, skip=("source", "records", "given")),
    "nsamples": None, "seqlen": None,  # None: the data's own (a recipe's, a set's), else DataSpec's (DataSpec.drawing)
    **_defaults(RunSpec),
    "output_dir": None, "format": None, "overwrite": False, "push_to_hub": None, "private": None,
}


def build_job(model: Any, data: Any = None, tokenizer: Any = None, /, **options: Any) -> CalibrationJob:
    """The CalibrationJob of a model (a local directory, hub id or loaded model), calibration data (a path or
    source spec, or in-memory data: quantkit.data.calibration.memory_calibration) and OPTIONS by name.

    Every option is checked on its own and against the others here; QuantkitError names what is wrong."""
    check_arguments(model, data, tokenizer, options, OPTIONS)
    o = {**OPTIONS, **options}
    data_spec = _data_spec(data, o)
    run = _run_spec(o)
    quantization = _quantization_spec(o, data_spec)
    if quantization.token_weights and data_spec.calib_set is None:
        import torch

        if torch.is_inference_mode_enabled():
            raise QuantkitError(f"{quantization.method}'s token weights come from a gradient pass, which "
                                "torch.inference_mode() forbids; call quantkit.quantize outside it")
    if data_spec.empty and (quantization.method.reads_samples or quantization.vision):
        method = quantization.method
        reader = (f"{method} reads activations" if method.needs_activations else
                  f"{method.presolve.name} (--smooth) reads activations" if method.presolve.name != "none" else
                  "--quantize-vision finds the vision side's linears on a sample")
        rtn = ", or --method rtn, which rounds each weight alone and needs none" if method.needs_activations else ""
        raise QuantkitError(f"no calibration data: {reader}; give --calib PATH (data=: a path, texts, image-text or chat "
                            f"records or a Dataset) or --calib-set DIR (calib_set=){rtn}")
    if data_spec.empty and data_spec.chat_template is not None:
        raise QuantkitError(f"--chat-template (chat_template=) renders chat calibration records, and this "
                            f"{quantization.method} run reads no data; drop it, or give --calib with chat records (data=)")
    export = _export_spec(o, quantization)
    loaded = None if isinstance(model, (str, os.PathLike)) else model
    in_memory = loaded is not None or data_spec.records is not None or tokenizer is not None
    if in_memory and run.in_processes:
        raise QuantkitError("a loaded model, a given tokenizer or in-memory data run in one process; for --nproc, "
                            "torchrun or --low-memory give the model as a path or hub id and the data as a path")
    if export.output is None and export.push_to_hub is None and run.in_processes:
        raise QuantkitError("--nproc, torchrun and --low-memory export from their ranks; give an output directory")
    from quantkit.engine.distributed import under_torchrun
    from quantkit.models import source_name

    if run.nproc > 1 and under_torchrun():
        raise QuantkitError("--nproc spawns local ranks itself; under torchrun leave it at 1")
    if loaded is not None and tokenizer is None:
        from quantkit.data.calibration import load_data_tokenizer

        if not getattr(getattr(loaded, "config", None), "_name_or_path", ""):
            # built in memory (from_config): no files to read a tokenizer from, and its class name is no hub id
            if not data_spec.empty or export.output is not None or export.push_to_hub is not None:
                raise QuantkitError(f"the {type(loaded).__name__} given was not loaded from files (its config has no "
                                    "_name_or_path), so it has no tokenizer to read the data or to export; pass "
                                    "tokenizer_or_processor=")
        else:
            tokenizer = load_data_tokenizer(source_name(loaded), loaded)
    return CalibrationJob(model=ModelSpec(source_name(model), o["dtype"], loaded, tokenizer), data=data_spec,
                          quantization=quantization, run=run, export=export)


def _data_spec(data: Any, o: dict) -> DataSpec:
    from quantkit.data.calibration import is_source

    source = os.fspath(data) if data is not None and is_source(data) else None
    template = None if o["chat_template"] is None else os.fspath(o["chat_template"])
    return DataSpec.drawing(source=source, calib_set=o["calib_set"], records=data if source is None else None,
                            nsamples=o["nsamples"], seqlen=o["seqlen"], seed=o["seed"], part=o["part"],
                            chat_template=template)


def _run_spec(o: dict) -> RunSpec:
    devices = None if o["devices"] is None else tuple(o["devices"])
    if o["offload_dir"] is not None and not (o["low_memory"] or o["resume"]):
        raise QuantkitError(f"--offload-dir {o['offload_dir']} (offload_dir=) keeps a --low-memory run's activations on "
                            "disk, and this run is in memory; add --low-memory (low_memory=True), or drop --offload-dir")
    low_memory = bool(o["resume"] or o["low_memory"])
    return RunSpec(device=o["device"], nproc=o["nproc"], devices=devices, dist_timeout=o["dist_timeout"],
                   low_memory=low_memory, offload_dir=o["offload_dir"], resume=o["resume"], progress=o["progress"],
                   hooks=o["hooks"])


def _method(o: dict) -> tuple[Method, bool | None]:
    """The method (the default where none is named) and the FP-target setting (None: the method's default)."""
    if o["method"] is not None:
        return method_for(o["method"]), o["fp_target"]
    method = default_method()
    if o["fp_target"] is None:
        return method, DEFAULT_FP_TARGET and method.needs_activations
    return method, o["fp_target"]


def _given_flags(name: str, o: dict) -> list[str]:
    """How the options under build_job name `name` that differ from their defaults are spelled (CLI and API)."""
    if name != "importance":
        return [] if o[name] == OPTIONS[name] else [f"--{name.replace('_', '-')} ({name}=)"]
    from quantkit.importance import TLQ_DEFAULTS

    return [f"{IMPORTANCE_FLAG_OF[key]} (importance={{{key!r}: ...}})" for key, value in (o[name] or {}).items()
            if value is not None and value != TLQ_DEFAULTS[key]]


def check_options_read(o: dict, method: Method, data: DataSpec) -> None:
    """Refuse an option given (other than its default) that the run's method does not read: it would change
    nothing, and the user would believe it did."""
    for name, purpose in METHOD_OPTIONS.items():
        given = _given_flags(name, o)
        if not given:
            continue
        if name not in method.options_read:
            readers = [m for m in METHODS if name in METHODS[m].reads]
            raise QuantkitError(f"{given[0]} has no effect with {method} ({METHODS[method.name].summary}): it "
                                f"{purpose}; drop it, or use --method {' or '.join(readers)}")
        if name == "importance" and data.calib_set is not None:
            raise QuantkitError(f"{given[0]} has no effect with --calib-set {data.calib_set}: the set brings its token "
                                f"weights; drop it, or make a set with it (quantkit importance {given[0].split()[0]})")


def _quantization_spec(o: dict, data: DataSpec) -> QuantizationSpec:
    if o["static_groups"] and not o["act_order"]:
        raise QuantkitError("--static-groups fixes the groups of an --act-order solve; drop it or drop --no-act-order")
    method, fp_target = _method(o)
    act_order = o["act_order"]
    weights = QuantSpec(**{name: o[name] for name in WEIGHT_OPTIONS if name != "static_groups"},
                        static_groups=act_order if o["static_groups"] is None else o["static_groups"])
    weights.validate()
    from quantkit.engine.presolve import smoothing_mode

    # the smoothing step (--smooth; auto: quantkit.quant.smooth.default_smooth), checked against the method
    step = smoothing_mode(resolve_smooth(o["smooth"], o["act_bits"], method.token_weights))
    step.check(method)
    method = method.with_presolve(step).with_expert_tokens(o["expert_tokens"] or DEFAULT_EXPERT_TOKENS)
    check_options_read(o, method, data)
    recipe = as_recipe(o["recipe"])
    importance = None
    if method.reads_token_weights and data.calib_set is None:
        from quantkit.data.calibration import holds_images
        from quantkit.importance import check_guidance, check_settings, resolve_importance

        # the data kind's defaults (quantkit.importance.tlq_defaults) under the options given, checked before the
        # model loads: a bad option must not cost a load and a forward pass
        importance = resolve_importance(o["importance"], holds_images(data.source if data.source is not None
                                                                      else data.records))
        check_settings(importance["lam"], importance["power"], None, 0.1)
        check_guidance(importance["guidance"], importance["row_groups"], importance["loss"], importance["draws"])
    if fp_target and not method.needs_activations:
        raise QuantkitError(f"--fp-target needs a method that reads activations (gptq, tlq): {method} reads none")
    quantization = QuantizationSpec(weights=weights, method=method, fp_target=method.fp_target_on(fp_target),
                                    lm_head=o["lm_head"], vision=o["vision"], recipe=recipe, importance=importance,
                                    recipe_file=os.fspath(o["recipe"]) if isinstance(o["recipe"], (str, os.PathLike)) else None)
    return quantization


def _export_spec(o: dict, quantization: QuantizationSpec) -> ExportSpec:
    from quantkit.export.formats import default_format, format_for

    if o["push_to_hub"] is not None:
        from quantkit.export.hub import check_repo_id

        check_repo_id(o["push_to_hub"])
    fmt = o["format"]
    weights, recipe = quantization.weights, quantization.recipe
    if fmt is None:
        # a format that holds every bit width the recipe uses
        widths = sorted(recipe.bits(weights.bits)) if recipe is not None else [weights.bits]
        fmt = default_format(next((b for b in widths if default_format(b) != default_format(weights.bits)), weights.bits))
    output = None if o["output_dir"] is None else os.fspath(o["output_dir"])
    if output is not None:
        from quantkit.fsutil import check_output_dir

        check_output_dir(output, o["overwrite"])
    fmt = format_for(fmt)
    fmt.check_options(weights.bits, weights.act_order, weights.static_groups, act_bits=weights.act_bits,
                      lm_head=quantization.lm_head, vision=quantization.vision)
    return ExportSpec(output=output, fmt=fmt.name, overwrite=o["overwrite"], push_to_hub=o["push_to_hub"],
                      private=o["private"])
