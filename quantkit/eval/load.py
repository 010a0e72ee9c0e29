"""Load a plain HF model or a quantkit export, with its tokenizer, for evaluation."""

from __future__ import annotations

import importlib
from pathlib import Path

from quantkit.errors import QuantkitError


def _load_quantized():
    """quantkit.load_quantized (the export room's loader)."""
    import quantkit

    fn = getattr(quantkit, "load_quantized", None)
    if fn is None:
        try:
            fn = importlib.import_module("quantkit.export").load_quantized
        except (ImportError, AttributeError) as err:
            raise QuantkitError("this directory is a quantkit export but quantkit.export is not available") from err
    return fn


def load_tokenizer(path: str | Path):
    """AutoTokenizer from a model directory or hub id, with a QuantkitError when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise QuantkitError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}; save one beside the model") from err


def load_for_eval(model_or_dir: str | Path):
    """(model, tokenizer): quantkit.load_quantized when the dir has a quantkit.json, else quantkit.models.load_model."""
    path = Path(model_or_dir).expanduser()
    if (path / "quantkit.json").is_file():
        model = _load_quantized()(str(path))
    else:
        from quantkit.models import load_model

        model = load_model(str(model_or_dir))
    model.eval()
    return model, load_tokenizer(model_or_dir)
