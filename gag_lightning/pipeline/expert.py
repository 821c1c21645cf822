"""Forwarding module for ``pipeline.memory`` (until it moves): the expert stage's runner is ``stages.expert.runner``."""

from gag_lightning.stages.expert.runner import sft_expert_path

__all__ = ["sft_expert_path"]
