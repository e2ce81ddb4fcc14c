"""rmt_scale: Recurrent Memory Transformers on any Hugging Face backbone, at million-token scale."""

__version__ = "0.1.0"
