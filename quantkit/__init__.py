"""quantkit: post-training quantization for Hugging Face LMs and VLMs."""

__version__ = "0.1.0"
