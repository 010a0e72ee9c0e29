"""Load a plain HF model or a quantkit export, with its tokenizer, for evaluation."""

from __future__ import annotations

from pathlib import Path

from quantkit.models.files import load_tokenizer


def load_for_eval(model_or_dir: str | Path):
    """(model, tokenizer): quantkit.load_quantized when the dir has a quantkit.json, else quantkit.models.load_model."""
    from quantkit.export.reader import is_quantkit_output

    if is_quantkit_output(model_or_dir):
        from quantkit.export.load import load_quantized

        model = load_quantized(str(Path(model_or_dir).expanduser()))
    else:
        from quantkit.models import load_model

        model = load_model(str(model_or_dir))
    model.eval()
    return model, load_tokenizer(model_or_dir)


def on_device(model, device: str):
    """The model on `device`, moved only where a parameter is elsewhere: transformers refuses .to() of an 8-bit
    bitsandbytes checkpoint below bitsandbytes 0.48 even where it already is, and such a model evaluates in place."""
    import torch

    target = torch.device(device)
    if all(p.device == target for p in model.parameters()):
        return model
    return model.to(device)
