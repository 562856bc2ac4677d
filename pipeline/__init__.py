"""pipeline: distributed training of VAEs with a categorical (multinomial) prior."""

__version__ = "0.1.0"
