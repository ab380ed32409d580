"""A training run's output directory: one run at a time, one run per directory.

    OUTPUT_DIR/.mindport-train.lock   flock held by the writing process (rank 0) for the run's life
    OUTPUT_DIR/metrics.jsonl, tensorboard/, loss_curve.png, checkpoints/   the run's files

* A second run into a locked directory fails at once, naming the holder's pid; the kernel
  releases the lock when the holder exits or dies, so a killed run never blocks the next one.
* A new run (no ``resume``) refuses a directory that holds a previous run's files, unless
  ``overwrite``: then those files (and only those) are deleted before the first step, once the
  new run's config, data and model have passed their checks, so nothing of the old run mixes
  with the new one and a run that cannot start deletes nothing. ``resume`` continues the run that is there.
* On taking the directory, leftovers of killed saves and deletions (``.tmp-step_*``,
  ``.trash-*``) are removed (:func:`~mindport.train.checkpoint.remove_leftovers`).
"""
from __future__ import annotations

import fcntl
import os

from mindport.config import ConfigError
from mindport.train.checkpoint import remove_leftovers, remove_tree
from mindport.train.logger import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR

LOCK_FILE = ".mindport-train.lock"
CHECKPOINTS_DIR = "checkpoints"
RUN_FILES = (CHECKPOINTS_DIR, METRICS_FILE, TENSORBOARD_DIR, PLOT_FILE)


class RunDirectory:
    """``open()`` takes the directory for this process; ``close()`` (or leaving a ``with``) gives it back."""

    def __init__(self, path: str):
        self.path = path
        self.checkpoints = os.path.join(path, CHECKPOINTS_DIR)
        self._lock = None
        self._to_delete: list[str] = []  # an overwritten previous run's files, deleted once the new run can start

    def previous_run(self) -> list[str]:
        """The run files already in the directory (a checkpoints/ without checkpoints does not count)."""
        found = [name for name in RUN_FILES if os.path.exists(os.path.join(self.path, name))]
        if CHECKPOINTS_DIR in found and not os.listdir(self.checkpoints):
            found.remove(CHECKPOINTS_DIR)
        return found

    def open(self, resume: bool, overwrite: bool, echo=print) -> None:
        """Lock the directory, refuse or delete a previous run (module docstring), remove leftovers."""
        if resume and overwrite:
            raise ConfigError(f"{self.path}: resume and overwrite both asked for: pick one")
        os.makedirs(self.path, exist_ok=True)
        self._take_lock()
        try:
            previous = self.previous_run()
            if previous and not resume:
                if not overwrite:
                    raise ConfigError(f"{self.path}: holds a previous run ({', '.join(previous)}): pass --resume to "
                                      f"continue it or --overwrite to delete it first")
                self._to_delete = previous
            leftovers = remove_leftovers(self.path, checkpoints=False) + remove_leftovers(self.checkpoints)
            if leftovers:
                echo(f"removed what an interrupted run left in {self.path}: {', '.join(leftovers)}")
        except BaseException:
            self.close()
            raise

    def delete_previous_run(self, echo=print) -> None:
        """With ``overwrite``: delete the previous run's files. Called once everything the new run needs
        has been checked (config, data, model), so a run that fails to start deletes nothing."""
        for name in self._to_delete:
            path = os.path.join(self.path, name)
            if os.path.isdir(path):
                remove_tree(path)
            else:
                os.remove(path)
        if self._to_delete:
            echo(f"overwrite: deleted the previous run's {', '.join(self._to_delete)} in {self.path}")
        self._to_delete = []

    def _take_lock(self) -> None:
        path = os.path.join(self.path, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.path}: in use by another training run (pid {holder}; lock {path}): wait for "
                              f"it to end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._lock = fd

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None
