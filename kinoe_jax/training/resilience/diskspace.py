"""Check before each save that the checkpoint will fit; a full disk must not leave a broken one.

The size of the next checkpoint is estimated from the newest committed one (or, before the
first, from the bytes of the train state), times a margin. Orbax deletes old checkpoints only
after the new one is committed, so the full size must be free.
"""

from __future__ import annotations

import os
import shutil

import gin
import jax
import numpy as np


def tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while we looked (an old checkpoint being deleted)
                pass
    return total


def state_bytes(state) -> int:
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
                   if hasattr(x, "shape")))


@gin.configurable
class DiskGuard:
    def __init__(self, directory: str, margin: float = 1.2, reserve_bytes: int = 0,
                 simulate_capacity_bytes: int | None = None):
        """`simulate_capacity_bytes`: pretend the disk holds only this much, of which the
        checkpoint directory's contents are used (tests without a small filesystem)."""
        self.directory = os.fspath(directory)
        self.margin = margin
        self.reserve_bytes = reserve_bytes
        self.capacity = simulate_capacity_bytes
        # Object stores (gs://, s3://) have no meaningful free space.
        self.local = "://" not in self.directory

    def free_bytes(self) -> int:
        if self.capacity is not None:
            return self.capacity - tree_bytes(self.directory)
        return shutil.disk_usage(self.directory).free

    def needed_bytes(self, state, latest_step: int | None, in_flight: bool = False) -> int:
        base = None
        if latest_step is not None:
            path = os.path.join(self.directory, str(latest_step))
            if os.path.isdir(path):
                base = tree_bytes(path)
        if not base:
            base = state_bytes(state)
        # A save still being written has not taken its space yet.
        return int(base * self.margin * (2 if in_flight else 1)) + self.reserve_bytes

    def check(self, state, latest_step: int | None, in_flight: bool = False) -> tuple[bool, int, int]:
        """(fits, needed, free) — always fits where free space cannot be measured."""
        if not self.local:
            return True, 0, -1
        needed = self.needed_bytes(state, latest_step, in_flight)
        free = self.free_bytes()
        return free >= needed, needed, free


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
