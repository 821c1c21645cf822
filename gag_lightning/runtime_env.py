"""Process settings the entry points make before torch loads: OpenMP reads them once, at its first parallel region."""

from __future__ import annotations

import os

__all__ = ["set_openmp_wait"]


def set_openmp_wait() -> None:
    """Idle OpenMP threads spin for some tens of microseconds (the gap between two ops of a decoding step), then
    sleep. Sleeping at once cost the memory stage a quarter of its speed on 2 cores; spinning on stalls a shared
    CPU. A user's own OMP_WAIT_POLICY is left to decide."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "30000")
