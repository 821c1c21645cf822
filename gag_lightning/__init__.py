"""gag-lightning: Generation-Augmented Generation with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
