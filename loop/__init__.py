"""embedloop: fine-tune embedding models on your own domain, in a loop."""

__version__ = "0.1.0"
