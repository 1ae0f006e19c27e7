"""mbdml: Mixup-based deep metric learning with the NNGK classifier, for few labels."""

__version__ = "0.1.0"
