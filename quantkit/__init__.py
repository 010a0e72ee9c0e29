"""quantkit: post-training quantization for Hugging Face LMs and VLMs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_quantized"]


def __getattr__(name: str):
    """Lazy top-level API (keeps `import quantkit` free of torch/transformers)."""
    if name == "load_quantized":
        from quantkit.export.checkpoint import load_quantized

        return load_quantized
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
