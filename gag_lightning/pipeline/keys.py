"""Forwarding module for ``pipeline.memory`` (until it moves): the artifact keys are in ``gag_lightning.keys``."""

from gag_lightning.fingerprints import file_digest, upstream_folder
from gag_lightning.keys import artifact_dir, container, memory_splits, stage_key

__all__ = ["artifact_dir", "container", "file_digest", "memory_splits", "stage_key", "upstream_folder"]
