"""One entry point for calibration data, whatever its kind: text, image-text JSONL or a recipe."""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.data.recipes import is_recipe, recipe_samples
from quantkit.data.samples import calibration_samples


def is_image_jsonl(source: str) -> bool:
    """True for a .jsonl file whose first record names an image (image-text calibration)."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "image" in record
    return False


def load_calibration(
    source: str, model_name: str, vlm: bool, nsamples: int, seqlen: int, seed: int = 0, part: str = "all"
) -> list[dict]:
    """Calibration samples for `model_name` from a text source, an image-text JSONL or a recipe.

    VLMs read image-text records through their processor (seqlen is then the longest sample);
    plain text gives windows of exactly seqlen tokens.
    """
    from transformers import AutoTokenizer

    processor = None
    if vlm and (is_recipe(source) or is_image_jsonl(source)):
        from quantkit.data.images import load_processor

        processor = load_processor(model_name)
    if is_recipe(source):
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(model_name)
        return recipe_samples(source, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, processor=processor)
    if processor is not None:
        from quantkit.data.images import image_text_samples

        return image_text_samples(source, processor, nsamples, seed=seed, max_length=seqlen)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    return calibration_samples(source, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part)
