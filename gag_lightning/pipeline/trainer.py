"""Forwarding module for ``pipeline.memory`` (until it moves): Trainer building is in ``stages._common.trainer``."""

from gag_lightning.stages._common.trainer import trainer_kwargs

__all__ = ["trainer_kwargs"]
