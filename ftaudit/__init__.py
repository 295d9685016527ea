"""ftaudit: audit what fine-tuning did to a base model."""

__version__ = "0.1.0"
