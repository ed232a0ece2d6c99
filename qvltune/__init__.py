"""qvltune: fine-tune Qwen3-VL from a dataset of images and answers to a merged, verified model."""

__version__ = "0.1.0"
