"""`quantkit importance`: compute TLQ token weights once and save them as a token-level calibration set."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import click
from transformers import AutoTokenizer

from quantkit.calibrate.job import OPTIONS, DataSpec
from quantkit.calibrate.run import draw_samples
from quantkit.cli_options import bounded, output_option
from quantkit.data.calibration import holds_images
from quantkit.data.checks import check_chat_data, check_data, data_paths, model_for_data
from quantkit.data.recipes import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from quantkit.engine.autocast import autocast_off
from quantkit.engine.distributed import check_device
from quantkit.errors import QuantkitError
from quantkit.fsutil import check_offload_dir, check_output, check_output_dir, scratch_dir
from quantkit.importance import (
    GUIDANCE_CHOICES,
    IMAGE_TLQ_DEFAULTS,
    LOSS_CHOICES,
    TLQ_DEFAULTS,
    check_guidance,
    check_settings,
    resolve_importance,
    save_calibration_set,
    tlq_token_weights,
)
from quantkit.importance.layers import FileLayers
from quantkit.models import load_model
from quantkit.models.files import check_seqlen

# the options that make the command's DataSpec (quantkit.calibrate.job)
DATA_OPTIONS = ("nsamples", "seqlen", "seed", "part", "chat_template")


def sample_options(command):
    """The click options of how calibration samples are drawn (DataSpec's), shared by `importance` and `calibrate`
    with build_job's defaults; each command words its own --calib and --seed."""
    options = [
        click.option("--chat-template", "chat_template", type=click.Path(dir_okay=False), default=None,
                     help="A Jinja chat template file that renders --calib chat records ({\"messages\": [...]} JSONL) "
                          "instead of the tokenizer's own template."),
        click.option("--part", type=click.Choice(["all", "train", "heldout"]), default=OPTIONS["part"], show_default=True,
                     help="Part of each text file to draw from (held-out = last 10%)."),
        click.option("--nsamples", type=bounded("nsamples"), default=OPTIONS["nsamples"],
                     help=f"Calibration sequences (default: the recipe's, else {DEFAULT_NSAMPLES})."),
        click.option("--seqlen", type=bounded("seqlen"), default=OPTIONS["seqlen"],
                     help="Tokens per calibration sequence (the most tokens of an image-text or chat sample; default: "
                          f"the recipe's, else {DEFAULT_SEQLEN})."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def importance_options(command):
    """The click options of TLQ's gradient pass, shared by `importance` and `calibrate`."""
    options = [
        click.option("--guidance", type=click.Choice(GUIDANCE_CHOICES), default=TLQ_DEFAULTS["guidance"], show_default=True,
                     help="TLQ token scores from the gradient at each layer's output, or at each linear's own output (GuidedQuant)."),
        click.option("--row-groups", type=bounded("row_groups"), default=TLQ_DEFAULTS["row_groups"], show_default=True,
                     help="With --guidance linear: groups of each linear's output rows, each with its own weighted Hessian (memory x groups)."),
        click.option("--importance-loss", type=click.Choice(LOSS_CHOICES), default=TLQ_DEFAULTS["loss"], show_default=True,
                     help="Gradients of the cross-entropy on the data's labels, or of the KL to the FP model (labels drawn from its softmax)."),
        click.option("--fisher-draws", type=bounded("draws"), default=TLQ_DEFAULTS["draws"], show_default=True,
                     help="With --importance-loss fisher: labels drawn per token (one backward each)."),
        click.option("--lam", type=bounded("lam"), default=None,
                     help=f"Floor of the mix w = (1-lam) s/mean(s) + lam. Default: {TLQ_DEFAULTS['lam']:g} on text (uniform "
                          f"weights), {IMAGE_TLQ_DEFAULTS['lam']:g} on image-text."),
        click.option("--output-side", "output_side", type=bounded("output_side"), default=None,
                     help=f"Rows per block of each linear's output-side factor E[g g^T] (GPTQ's row metric; 0: none). "
                          f"Default: {TLQ_DEFAULTS['output_side']} on text, none on image-text."),
        click.option("--power", type=bounded("power"), default=TLQ_DEFAULTS["power"], show_default=True, help="Exponent p on the raw scores before normalising."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_calibration_set(model_name: str, data: DataSpec, output: str, *, importance: dict | None = None,
                          device: str = "cpu", offload_dir: str | None = None, overwrite: bool = False,
                          progress: bool = True, low_memory: bool = False) -> dict:
    """Draw `data`'s samples, compute TLQ importance under `model_name` and save the set; return its manifest.
    With `low_memory` the model is not loaded whole: the gradient pass reads one decoder layer at a time from its
    safetensors files (quantkit.importance.layers.FileLayers), and the set is the same.

    importance holds tlq_token_weights' options (lam, power, guidance, row_groups, loss, draws, output_side,
    per_modality, top_fraction, floor_fraction; None or absent: the data kind's default, quantkit.importance.tlq_defaults);
    the seed is the data's. Chat records are rendered
    with data.chat_template, else the tokenizer's own template."""
    from quantkit.calibrate.arguments import check_set_arguments

    check_set_arguments(data, importance)
    options = {"top_fraction": None, "floor_fraction": 0.1} | resolve_importance(importance, holds_images(data.source))
    check_settings(options["lam"], options["power"], options["top_fraction"], options["floor_fraction"])
    if options["top_fraction"] is None and options["floor_fraction"] != 0.1:
        raise QuantkitError(f"--floor-fraction {options['floor_fraction']} (floor_fraction=) sets how many of the tokens "
                            "--top-fraction drops are kept at random, and no --top-fraction is given; give one, or "
                            "drop --floor-fraction")
    check_guidance(options["guidance"], options["row_groups"], options["loss"], options["draws"])
    if options.get("per_modality") and not holds_images(data.source):
        raise QuantkitError(f"--per-modality normalises image and text tokens apart, but {data.source} holds no "
                            "image-text records; give image-text data or drop --per-modality")
    check_output_dir(output, overwrite)
    preflight_importance(model_name, data, output, device=device, offload_dir=offload_dir, overwrite=overwrite)
    started = time.perf_counter()
    streamed = {}
    if low_memory:
        from quantkit.models.streamed import build_skeleton

        model, adapter, source = build_skeleton(model_name, "float32")
        streamed["layers_from"] = FileLayers(model, adapter, source, device, "float32")
    else:
        model = load_model(model_name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    samples, _ = draw_samples(data, model_name, model, tokenizer)
    with scratch_dir(offload_dir), autocast_off([device]):  # the caller's autocast is no part of the weights
        weights = tlq_token_weights(model, samples, seed=data.seed, device=device, offload_dir=offload_dir,
                                    progress=progress, **streamed, **options)
    extra = {"calib": data.source, "part": data.part, "seqlen": data.seqlen, "seed": data.seed,
             "chat_template": data.chat_template, "seconds": round(time.perf_counter() - started, 3)}
    with fingerprinted_layers(streamed.get("layers_from")):
        return save_calibration_set(output, samples, weights, model, model_name, tokenizer, extra=extra,
                                    overwrite=overwrite)


@contextlib.contextmanager
def fingerprinted_layers(layers: FileLayers | None) -> Iterator[None]:
    """With a streamed skeleton's `layers`, its first and last decoder layers read while the set is saved: the set
    records a few of their weights (importance.identity.weights_fingerprint) as a set made in memory does."""
    ends = [] if layers is None else sorted({0, len(layers.layers) - 1})
    for index in ends:
        layers.get(index).to("cpu")
    try:
        yield
    finally:
        for index in ends:
            layers.done(index)


def preflight_importance(model_name: str, data: DataSpec, output: str, *, device: str, offload_dir: str | None,
                         overwrite: bool) -> None:
    """Everything `quantkit importance` can check before it loads the model."""
    check_device(device)
    check_data(data.source, part=data.part, chat_template=data.chat_template)
    check_offload_dir(offload_dir, [model_name])
    files = model_for_data(model_name, data.source)
    check_seqlen(files.config, data.seqlen, recipe=data.recipe_of("seqlen"))
    from quantkit.data.calibration import check_source_for_model
    from quantkit.models import is_vlm

    check_source_for_model(data.source, is_vlm(files.config), model_name)
    check_chat_data(data.source, data.chat_template, files)
    check_output(output, overwrite=overwrite, sources=[model_name, offload_dir, *data_paths(data.source)])


@click.command()
@click.argument("model")
@click.option("--calib", required=True, help="Calibration data: .txt/.jsonl file, glob, directory, hf:DATASET, a calib/ recipe (.yaml), or chat records ({\"messages\": [...]} JSONL).")
@sample_options
@click.option("--seed", type=bounded("seed"), default=OPTIONS["seed"], show_default=True, help="Seed for drawing windows and the top-fraction floor sample.")
@importance_options
@click.option("--per-modality", is_flag=True, help="Normalise scores within vision and within text tokens separately.")
@click.option("--top-fraction", type=bounded("top_fraction"), default=None, help="Keep only this fraction of tokens by weight (plus a random floor sample).")
@click.option("--floor-fraction", type=bounded("floor_fraction"), default=0.1, show_default=True, help="With --top-fraction: share of the other tokens kept at random.")
@click.option("--device", default=OPTIONS["device"], show_default=True, help="Compute device for the current layer.")
@click.option("--offload-dir", type=click.Path(file_okay=False), default=None, help="Keep stored layer inputs on disk here instead of in RAM.")
@click.option("--low-memory", is_flag=True, help="Read one decoder layer at a time from the safetensors files instead of loading the model whole (each layer is read twice).")
@output_option(required=True, type=click.Path(), help="Output calibration-set directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
def importance(model: str, calib: str, output: str, overwrite: bool, as_json: bool, device: str,
               offload_dir: str | None, low_memory: bool, **options) -> None:
    """Compute TLQ token importance of MODEL on --calib data and save a token-level calibration set."""
    data = DataSpec.drawing(source=calib, **{key: options.pop(key) for key in DATA_OPTIONS})
    options["loss"], options["draws"] = options.pop("importance_loss"), options.pop("fisher_draws")
    manifest = build_calibration_set(model, data, output, importance=options, device=device, offload_dir=offload_dir,
                                     overwrite=overwrite, progress=not as_json, low_memory=low_memory)
    if as_json:
        click.echo(json.dumps(manifest | {"output": output}))
    else:
        report = manifest["report"]
        click.echo(
            f"token-level calibration set for {model}: {manifest['nsamples']} samples, {manifest['num_layers']} layers, "
            f"{report['scored_tokens']} scored tokens in {manifest['seconds']:.1f}s -> {output}"
        )
