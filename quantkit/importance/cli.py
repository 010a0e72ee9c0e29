"""`quantkit importance`: compute TLQ token weights once and save them as a token-level calibration set."""

from __future__ import annotations

import json
import time

import click
from transformers import AutoTokenizer

from quantkit.cli_options import output_option
from quantkit.data.calibration import load_calibration
from quantkit.data.images import load_processor
from quantkit.data.recipes import is_recipe, load_recipe, recipe_samples
from quantkit.errors import QuantkitError
from quantkit.fsutil import check_output_dir, scratch_dir
from quantkit.importance import (
    GUIDANCE_CHOICES,
    LOSS_CHOICES,
    TLQ_DEFAULTS,
    check_guidance,
    check_settings,
    save_calibration_set,
    tlq_token_weights,
)
from quantkit.models import load_model
from quantkit.validate import preflight_importance


def importance_options(command):
    """The click options of TLQ's gradient pass, shared by `importance` and `calibrate`."""
    options = [
        click.option("--guidance", type=click.Choice(GUIDANCE_CHOICES), default=TLQ_DEFAULTS["guidance"], show_default=True,
                     help="TLQ token scores from the gradient at each layer's output, or at each linear's own output (GuidedQuant)."),
        click.option("--row-groups", type=int, default=TLQ_DEFAULTS["row_groups"], show_default=True,
                     help="With --guidance linear: groups of each linear's output rows, each with its own weighted Hessian (memory x groups)."),
        click.option("--importance-loss", type=click.Choice(LOSS_CHOICES), default=TLQ_DEFAULTS["loss"], show_default=True,
                     help="Gradients of the cross-entropy on the data's labels, or of the KL to the FP model (labels drawn from its softmax)."),
        click.option("--fisher-draws", type=int, default=TLQ_DEFAULTS["draws"], show_default=True,
                     help="With --importance-loss fisher: labels drawn per token (one backward each)."),
        click.option("--lam", type=float, default=TLQ_DEFAULTS["lam"], show_default=True, help="Floor of the mix w = (1-lam) s/mean(s) + lam."),
        click.option("--power", type=float, default=TLQ_DEFAULTS["power"], show_default=True, help="Exponent p on the raw scores before normalising."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_calibration_set(
    model_name: str,
    calib: str,
    output: str,
    *,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    part: str = "all",
    lam: float = TLQ_DEFAULTS["lam"],
    power: float = TLQ_DEFAULTS["power"],
    guidance: str = TLQ_DEFAULTS["guidance"],
    row_groups: int = TLQ_DEFAULTS["row_groups"],
    loss: str = TLQ_DEFAULTS["loss"],
    draws: int = TLQ_DEFAULTS["draws"],
    per_modality: bool = False,
    top_fraction: float | None = None,
    floor_fraction: float = 0.1,
    device: str = "cpu",
    offload_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chat_template: str | None = None,
) -> dict:
    """Draw samples from `calib`, compute TLQ importance under `model_name` and save the set; return its manifest.
    Chat records are rendered with the Jinja file `chat_template`, else the tokenizer's own template."""
    check_settings(lam, power, top_fraction, floor_fraction)
    check_guidance(guidance, row_groups, loss, draws)
    check_output_dir(output, overwrite)
    image_data = is_recipe(calib) and load_recipe(calib).kind != "text"
    preflight_importance(model_name, calib, output, seqlen=seqlen, device=device, offload_dir=offload_dir,
                         overwrite=overwrite, image_data=image_data, chat_template=chat_template, part=part)
    started = time.perf_counter()
    model = load_model(model_name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if is_recipe(calib):
        recipe = load_recipe(calib)
        processor = None
        if recipe.kind != "text":
            processor = load_processor(model_name)
        samples = recipe_samples(recipe, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, processor=processor)
    else:  # text windows, or chat records with their loss mask on the assistant's tokens
        samples = load_calibration(calib, model_name, False, nsamples, seqlen, seed, part, tokenizer_or_processor=tokenizer,
                                   chat_template=chat_template)
    with scratch_dir(offload_dir):
        importance = tlq_token_weights(
            model, samples, lam=lam, power=power, per_modality=per_modality, top_fraction=top_fraction,
            floor_fraction=floor_fraction, seed=seed, device=device, offload_dir=offload_dir, progress=progress,
            guidance=guidance, row_groups=row_groups, loss=loss, draws=draws,
        )
    extra = {"calib": calib, "part": part, "seqlen": seqlen, "seed": seed, "chat_template": chat_template,
             "seconds": round(time.perf_counter() - started, 3)}
    return save_calibration_set(output, samples, importance, model, model_name, tokenizer, extra=extra, overwrite=overwrite)


@click.command()
@click.argument("model")
@click.option("--calib", required=True, help="Calibration data: .txt/.jsonl file, glob, directory, hf:DATASET, a calib/ recipe (.yaml), or chat records ({\"messages\": [...]} JSONL).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per sequence (max tokens of an image-text or chat sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing windows and the top-fraction floor sample.")
@click.option("--part", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True, help="Part of each text file to draw from (held-out = last 10%).")
@click.option("--chat-template", "chat_template", type=click.Path(dir_okay=False), default=None, help="A Jinja chat template file that renders --calib chat records ({\"messages\": [...]} JSONL) instead of the tokenizer's own template.")
@importance_options
@click.option("--per-modality", is_flag=True, help="Normalise scores within vision and within text tokens separately.")
@click.option("--top-fraction", type=float, default=None, help="Keep only this fraction of tokens by weight (plus a random floor sample).")
@click.option("--floor-fraction", type=float, default=0.1, show_default=True, help="With --top-fraction: share of the other tokens kept at random.")
@click.option("--device", default="cpu", show_default=True, help="Compute device for the current layer.")
@click.option("--offload-dir", type=click.Path(file_okay=False), default=None, help="Keep stored layer inputs on disk here instead of in RAM.")
@output_option(required=True, type=click.Path(), help="Output calibration-set directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
def importance(model, calib, nsamples, seqlen, seed, part, chat_template, guidance, row_groups, importance_loss, fisher_draws, lam, power, per_modality, top_fraction, floor_fraction, device, offload_dir, output, overwrite, as_json) -> None:
    """Compute TLQ token importance of MODEL on --calib data and save a token-level calibration set."""
    if nsamples <= 0 or seqlen <= 1:
        raise QuantkitError("--nsamples must be positive and --seqlen at least 2")
    manifest = build_calibration_set(
        model, calib, output, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part, lam=lam, power=power,
        guidance=guidance, row_groups=row_groups, loss=importance_loss, draws=fisher_draws,
        per_modality=per_modality, top_fraction=top_fraction, floor_fraction=floor_fraction, device=device,
        offload_dir=offload_dir, overwrite=overwrite, progress=not as_json, chat_template=chat_template,
    )
    if as_json:
        click.echo(json.dumps(manifest | {"output": output}))
    else:
        report = manifest["report"]
        click.echo(
            f"token-level calibration set for {model}: {manifest['nsamples']} samples, {manifest['num_layers']} layers, "
            f"{report['scored_tokens']} scored tokens in {manifest['seconds']:.1f}s -> {output}"
        )
