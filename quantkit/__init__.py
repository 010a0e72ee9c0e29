"""quantkit: post-training quantization for Hugging Face LMs and VLMs.

`quantkit.quantize(...)` quantizes a model and `quantkit.load_quantized(dir)` loads an export; bad input
raises `quantkit.QuantkitError` (the API's one exception type) with the message the CLI prints.
"""

from __future__ import annotations

import logging

from quantkit.errors import QuantkitError, check_tqdm_environment
from quantkit.version import __version__

# Library convention: quantkit's log records (logger "quantkit" and its children) go nowhere unless the
# application configures logging; the CLI sends warnings (with --debug, everything) to stderr.
logging.getLogger(__name__).addHandler(logging.NullHandler())


__all__ = ["Override", "QuantkitError", "Quantized", "Recipe", "__version__", "load_quantized", "quantize"]


def __getattr__(name: str):
    """Lazy top-level API (keeps `import quantkit` free of torch/transformers)."""
    if name in ("load_quantized", "quantize", "Quantized", "Recipe", "Override"):
        check_tqdm_environment()  # each imports torch, which imports tqdm: one QuantkitError, as the CLI's line
    if name == "load_quantized":
        from quantkit.export.load import load_quantized

        return load_quantized
    if name in ("quantize", "Quantized"):
        from quantkit import api

        return getattr(api, name)
    if name in ("Recipe", "Override"):
        from quantkit.quant import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
