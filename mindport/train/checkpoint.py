"""Atomic training checkpoints: ``OUTPUT_DIR/checkpoints/step_XXXXXXXX/``.

A checkpoint directory is a mindport model directory that
``AutoModelForCausalLM.from_pretrained`` loads as it is, plus the training state:

    config.json                   {"mindport_config": ModelConfig.to_dict()}  (fp32 dtypes)
    model.safetensors             fp32 weights under the model's parameter names (O2: the masters)
    tokenizer.model, tokenizer_config.json   when the run has a tokenizer
    train_state/optimizer.safetensors        AdamW moments and step, loss-scale value (and counter)
    train_state/state.json        step, LR, data position, RNG state, the run's settings

Everything is written into a temporary sibling directory, each file fsynced, then the
directory is renamed into place and the parent fsynced; a kill at any moment leaves either
the previous checkpoints or the new one complete, never a partial ``step_*`` directory.
Only the last ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np

from mindport.ckpt_tools.safetensors_io import CheckpointError, SafetensorsReader, SafetensorsWriter, numpy_dtype_code

STATE_DIR = "train_state"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Test hook: "SECONDS" or "STEP:SECONDS" sleeps between the files of a save (of that step only),
# so a test can kill the process in the middle of writing a checkpoint.
SLOW_SAVE_ENV = "MINDPORT_TEST_SLOW_SAVE"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(path: str, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """One safetensors file from numpy arrays (fsynced on close)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    writer = SafetensorsWriter(path, [(k, numpy_dtype_code(v), v.shape) for k, v in arrays.items()],
                               metadata or {"format": "pt"})
    for name, array in arrays.items():
        writer.write(name, array)
    writer.close()


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    with SafetensorsReader(path) as reader:
        return {name: np.array(reader.get(name)) for name in reader.keys()}


def _pause(step: int) -> None:
    value = os.environ.get(SLOW_SAVE_ENV, "")
    if not value:
        return
    only, _, seconds = value.rpartition(":")
    if only and int(only) != step:
        return
    time.sleep(float(seconds))


class CheckpointManager:
    """Saves, lists and loads the checkpoints of one run directory."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.keep = keep

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (temporary directories are ignored)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            if m and os.path.isfile(os.path.join(self.directory, name, STATE_DIR, "state.json")):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> str | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, model_config, weights: dict[str, np.ndarray], state_arrays: dict[str, np.ndarray],
             state: dict, tokenizer=None) -> str:
        final = self.path(step)
        os.makedirs(self.directory, exist_ok=True)
        tmp = os.path.join(self.directory, f".tmp-step_{step:08d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, STATE_DIR))
        try:
            _write_json(os.path.join(tmp, "config.json"),
                        {"mindport_config": model_config.replace(param_dtype="float32",
                                                                 compute_dtype="float32").to_dict()})
            write_safetensors(os.path.join(tmp, "model.safetensors"), weights)
            _pause(step)
            write_safetensors(os.path.join(tmp, STATE_DIR, "optimizer.safetensors"), state_arrays)
            _pause(step)
            if tokenizer is not None:
                tokenizer.save(tmp)
                for name in os.listdir(tmp):
                    if name.startswith("tokenizer"):
                        with open(os.path.join(tmp, name), "rb+") as f:
                            os.fsync(f.fileno())
            _write_json(os.path.join(tmp, STATE_DIR, "state.json"), state)
            _fsync_dir(os.path.join(tmp, STATE_DIR))
            _fsync_dir(tmp)
            if os.path.exists(final):  # the same step saved again (e.g. after a resume): swap
                old = f"{final}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        steps = self.steps()
        for step in steps[:-self.keep]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for name in os.listdir(self.directory):  # leftovers of killed saves
            if name.startswith(".tmp-step_") and not name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    @staticmethod
    def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
        """(weights, optimizer/scaler arrays, state) of a checkpoint directory."""
        state_path = os.path.join(path, STATE_DIR, "state.json")
        if not os.path.isfile(state_path):
            raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_DIR}/state.json)")
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        weights = read_safetensors(os.path.join(path, "model.safetensors"))
        arrays = read_safetensors(os.path.join(path, STATE_DIR, "optimizer.safetensors"))
        return weights, arrays, state
