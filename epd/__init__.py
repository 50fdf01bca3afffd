"""EPD: Encode, Prefill and Decode disaggregated serving of large multimodal models."""

__version__ = "0.1.0"
