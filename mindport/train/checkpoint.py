"""Atomic training checkpoints: ``OUTPUT_DIR/checkpoints/step_XXXXXXXX/``.

A checkpoint directory is a mindport model directory that
``AutoModelForCausalLM.from_pretrained`` loads as it is, plus the training state:

    config.json                   {"mindport_config": ModelConfig.to_dict()}  (fp32 dtypes)
    model.safetensors             fp32 weights under the model's parameter names (O2: the masters)
    tokenizer.model, tokenizer_config.json   when the run has a tokenizer
    train_state/optimizer.safetensors        AdamW moments and step, loss-scale value (and counter)
    train_state/state.json        step, LR, data position, RNG state, the run's settings

Under a parallel layout (more than one process) the weights are per-rank shards in the
converter's format, so ``mindport convert merge`` joins them and ``from_pretrained`` under the
same layout loads them:

    config.json, layout.json      layout.json as ``mindport convert --tp --pp --ep`` writes it
    rank_XXXX/model.safetensors   written by the ranks with dp_rank < ep and cp_rank 0 (the others
                                  are replicas of these)
    train_state/state.json        rank 0's, with the run's parallel_config
    train_state/rank_XXXXX.safetensors  optimizer state by global rank: every rank under ZeRO
                                  (``optimizer_shard``: each holds a slice), else the weight writers

A LoRA run (``pet_config``) saves only what it trains (the base is frozen and comes from
``load_checkpoint``): ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's tensor
names replace config.json's weights, so a single-process checkpoint is a PEFT adapter directory;
under a layout each ``rank_XXXX/adapter_model.safetensors`` holds that rank's slices of the adapter
under mindport names (layout.json describes them, as for any per-rank shards), which
``from_pretrained(base, adapter=CKPT)`` and ``mindport lora merge`` join into PEFT's tensors.

Every rank must see OUTPUT_DIR (one node, or a shared file system). All ranks write into one
temporary directory (rank 0's, named with its pid, broadcast); after a barrier rank 0 renames it.

Everything is written into a temporary sibling directory, each file fsynced, then the
directory is renamed into place and the parent fsynced; a checkpoint is deleted by renaming it
to a hidden ``.trash-*`` sibling first. A kill at any moment leaves every ``step_*`` directory
complete; the hidden leftovers are removed by :func:`remove_leftovers` when the next run starts.
Only the last ``keep`` checkpoints up to the one just written are kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import time

import numpy as np

from mindport.checkpoint.model_files import carry_files
from mindport.checkpoint.safetensors_io import CheckpointError, SafetensorsReader, SafetensorsWriter, numpy_dtype_code
from mindport.config import MINDPORT_KEY, ConfigError, ParallelConfig, parameter_shapes
from mindport.models.lora import ADAPTER_WEIGHTS, from_peft, to_peft, trained_shapes, write_adapter_config
from mindport.parallel.layout import LAYOUT_FILE, export_rank, layout_text, rank_dir_name, rank_directory, rank_layout

STATE_DIR = "train_state"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX, TRASH_PREFIX = ".tmp-step_", ".trash-"
# Test hooks: "SECONDS" or "STEP:SECONDS" sleeps between the files of a save (of that step only);
# "SECONDS" sleeps in a deletion between renaming the directory away and deleting it; so a test
# can kill the process in the middle of writing or pruning a checkpoint.
SLOW_SAVE_ENV = "MINDPORT_TEST_SLOW_SAVE"
SLOW_PRUNE_ENV = "MINDPORT_TEST_SLOW_PRUNE"


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


def _pause(env: str, step: int | None = None) -> None:
    value = os.environ.get(env, "")
    if not value:
        return
    only, _, seconds = value.rpartition(":")
    if only and int(only) != step:
        return
    time.sleep(float(seconds))


def remove_tree(path: str) -> None:
    """Delete directory ``path`` so that it is whole or absent at every moment: rename it to a hidden
    ``.trash-*`` sibling (atomic), then delete that."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    _fsync_dir(parent)
    _pause(SLOW_PRUNE_ENV)
    shutil.rmtree(trash, ignore_errors=True)


def is_complete(path: str) -> bool:
    """A checkpoint directory holds config.json and its train state (written last, before the rename)."""
    return os.path.isfile(os.path.join(path, "config.json")) and \
        os.path.isfile(os.path.join(path, STATE_DIR, "state.json"))


def remove_leftovers(directory: str, checkpoints: bool = True) -> list[str]:
    """Remove what killed deletions (``.trash-*``) and, in a checkpoints directory, killed saves
    (``.tmp-step_*``, and incomplete ``step_*`` directories older versions left) left in ``directory``;
    returns their names. Only while no run writes there (the run directory's lock is held)."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(TRASH_PREFIX) or (checkpoints and name.startswith(TMP_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
        elif checkpoints and _STEP_DIR.match(name) and not is_complete(path):
            remove_tree(path)
        else:
            continue
        removed.append(name)
    return removed


def all_ranks_sum(groups, values) -> np.ndarray:
    """Sum of ``values`` (float32 array) over every rank of ``groups``; doubles as a barrier."""
    from mindspore import Tensor

    from mindport.parallel.comm import collectives

    values = np.asarray(values, np.float32)
    if len(groups.world.ranks) == 1:
        return values
    return collectives(groups.world).all_reduce(Tensor(values)).asnumpy()


def together(groups, what: str, fn):
    """``fn()`` on every rank; when it fails on any rank it fails on all, so no rank is left waiting
    in a collective: this rank's own error, or one counting the ranks that failed."""
    if groups is None or len(groups.world.ranks) == 1:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - raised below, once every rank knows
        error = exc
    failed = int(all_ranks_sum(groups, 1.0 if error is not None else 0.0))
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{what}: failed on {failed} other rank(s) (see their logs)")
    return result


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def agreed_stop(groups, signum: int | None) -> int | None:
    """The stop signal every rank acts on: SIGINT if any rank received it, else SIGTERM if any did,
    else None (a collective: all ranks call it at the same step, so all stop after the same step)."""
    received = all_ranks_sum(groups, [float(signum == s) for s in STOP_SIGNALS])
    return next((s for s, count in zip(STOP_SIGNALS, received) if count), None)


class CheckpointManager:
    """Saves, lists and loads the checkpoints of one run directory.

    ``groups`` (a :class:`~mindport.parallel.state.ParallelGroups` of more than one process)
    switches to per-rank shards; ``sharded_state``: the optimizer state differs on every data-
    parallel rank (ZeRO), so every rank writes its own. ``model_files_from`` (the run's
    ``load_checkpoint``): every checkpoint carries that directory's tokenizer, remote code and HF
    config.json (:func:`~mindport.ckpt_tools.model_files.carry_files`). ``lora`` (a LoRA run's
    LoraConfig, with its ``model_config``): the weights are the adapter, in PEFT's format.
    """

    def __init__(self, directory: str, keep: int = 2, groups=None, sharded_state: bool = False,
                 model_files_from: str | None = None, lora=None, model_config=None):
        self.directory = os.path.abspath(directory)
        self.lora = lora  # a LoRA run's LoraConfig (with its model_config): weights are the adapter, PEFT names
        self.weights_name = ADAPTER_WEIGHTS if lora else "model.safetensors"
        self.model_config = model_config
        if lora:
            self._shapes = trained_shapes(model_config, lora)
        self.keep = keep
        self.model_files_from = model_files_from  # a model directory whose non-weight files every checkpoint carries
        self.groups = groups if groups is not None and len(groups.world.ranks) > 1 else None
        self.sharded_state = sharded_state

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (hidden directories are ignored)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            if m and is_complete(os.path.join(self.directory, name)):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> str | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    # ------------------------------------------------------------------ which rank writes what
    def _export_rank(self) -> int | None:
        """This rank's ``rank_XXXX`` in the weight shards, or None for a replica (dp >= ep or cp > 0)."""
        c = self.groups.coords
        if c["dp"] >= self.groups.config.expert_parallel or c["cp"]:
            return None
        return export_rank(self.groups)

    def _state_rank(self) -> int:
        """The global rank whose optimizer-state file this rank writes (itself) or reads."""
        from mindport.parallel.state import rank_of

        g = self.groups
        if self.sharded_state:
            return g.global_rank
        c = g.coords
        return rank_of(g.config, dp=c["dp"] % g.config.expert_parallel, pp=c["pp"], cp=0, tp=c["tp"])

    def together(self, what: str, fn):
        """:func:`together` over this run's ranks."""
        return together(self.groups, what, fn)

    def files(self, path: str) -> tuple[str, str]:
        """(weights file, optimizer-state file) this rank reads from checkpoint ``path``."""
        if self.groups is None:
            return os.path.join(path, self.weights_name), os.path.join(path, STATE_DIR, "optimizer.safetensors")
        return (os.path.join(rank_directory(path, self.groups), self.weights_name),
                os.path.join(path, STATE_DIR, f"rank_{self._state_rank():05d}.safetensors"))

    # ------------------------------------------------------------------ saving
    def save(self, step: int, model_config, weights: dict[str, np.ndarray], state_arrays: dict[str, np.ndarray],
             state: dict, tokenizer=None) -> str:
        final = self.path(step)
        lead = self.groups is None or self.groups.global_rank == 0
        pid = os.getpid() if lead else 0
        if self.groups is not None:
            pid = int(all_ranks_sum(self.groups, pid))  # rank 0's pid names the shared temporary directory
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{step:08d}-{pid}")
        try:
            self.together(f"{tmp}: creating", lambda: lead and self._create(tmp))
            self.together(f"{tmp}: writing", lambda: self._write_rank_files(tmp, step, weights, state_arrays))
            self.together(f"{final}: publishing",
                          lambda: lead and self._finish(tmp, final, step, model_config, state, tokenizer))
        except BaseException:
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _create(self, tmp: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, STATE_DIR))

    def _write_rank_files(self, tmp: str, step: int, weights: dict, state_arrays: dict) -> None:
        if self.groups is None:
            weights_file, state_file = self.files(tmp)
        else:
            export = self._export_rank()
            weights_file = None if export is None else os.path.join(tmp, rank_dir_name(export), self.weights_name)
            mine = self._state_rank() == self.groups.global_rank
            state_file = os.path.join(tmp, STATE_DIR, f"rank_{self.groups.global_rank:05d}.safetensors") if mine \
                else None
        if weights_file is not None and self.lora and self.groups is None:
            weights = to_peft(self.model_config, self.lora, weights)
        if weights_file is not None:
            os.makedirs(os.path.dirname(weights_file), exist_ok=True)
            write_safetensors(weights_file, weights)
            _fsync_dir(os.path.dirname(weights_file))
        _pause(SLOW_SAVE_ENV, step)
        if state_file is not None:
            write_safetensors(state_file, state_arrays)
        _pause(SLOW_SAVE_ENV, step)

    def _finish(self, tmp: str, final: str, step: int, model_config, state: dict, tokenizer) -> None:
        self._write_shared_files(tmp, model_config, state, tokenizer)
        self._publish(tmp, final)
        self._prune(step)

    def _write_shared_files(self, tmp: str, model_config, state: dict, tokenizer) -> None:
        config = model_config.replace(param_dtype="float32", compute_dtype="float32")
        _write_json(os.path.join(tmp, "config.json"), {MINDPORT_KEY: config.to_dict()})
        if self.groups is not None:

            p = self.groups.config
            shapes = self._shapes if self.lora else parameter_shapes(config)
            layout, _ = rank_layout({n: ("F32", shape) for n, shape in shapes.items()}, config,
                                    p.model_parallel, p.pipeline_stage, p.expert_parallel, p.offset or None)
            with open(os.path.join(tmp, LAYOUT_FILE), "w", encoding="utf-8") as f:
                f.write(layout_text(layout))
                f.flush()
                os.fsync(f.fileno())
        carry_files(self.model_files_from, tmp)  # its tokenizer, remote code, HF config
        if self.lora:
            write_adapter_config(tmp, self.lora, self.model_files_from)
        if tokenizer is not None:
            tokenizer.save(tmp)
            for name in os.listdir(tmp):
                if name.startswith("tokenizer"):
                    with open(os.path.join(tmp, name), "rb+") as f:
                        os.fsync(f.fileno())
        _write_json(os.path.join(tmp, STATE_DIR, "state.json"), state)
        _fsync_dir(os.path.join(tmp, STATE_DIR))
        _fsync_dir(tmp)

    def _publish(self, tmp: str, final: str) -> None:
        if os.path.exists(final):  # the same step saved again (a run never does: it saves past its start)
            remove_tree(final)
        os.replace(tmp, final)
        _fsync_dir(self.directory)

    def _prune(self, step: int) -> None:
        """Keep the last ``keep`` checkpoints up to ``step`` (just written); never one past it."""
        older = [s for s in self.steps() if s < step]
        for old in older[:max(0, len(older) - (self.keep - 1))]:
            remove_tree(self.path(old))

    # ------------------------------------------------------------------ loading
    def load(self, path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
        """(weights, optimizer/scaler arrays, state) of a checkpoint directory, for this rank."""
        state_path = os.path.join(path, STATE_DIR, "state.json")
        if not os.path.isfile(state_path):
            raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_DIR}/state.json)")
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        self._check_layout(state_path, state.get("parallel", {}))
        weights_file, state_file = self.files(path)
        weights = read_safetensors(weights_file)
        if self.lora and self.groups is None:
            weights = from_peft(self.model_config, self.lora, weights)
        return weights, read_safetensors(state_file), state

    def _check_layout(self, state_path: str, saved: dict) -> None:
        """A checkpoint resumes only under the layout that wrote it."""
        ours = dataclasses.asdict(self.groups.config) if self.groups is not None else {}
        keys = RESUME_KEYS + (("micro_batch_num",) if ours.get("pipeline_stage", 1) > 1 else ())
        defaults = dataclasses.asdict(ParallelConfig())
        for key in keys:
            before, now = saved.get(key, defaults[key]), ours.get(key, defaults[key])
            if before != now:
                raise ConfigError(f"{state_path}: saved under parallel_config key '{key}' = {before!r}, this run has "
                                  f"{now!r}: resume under the same layout (or `mindport convert merge` the weights "
                                  f"and start a new run from them with load_checkpoint)")


# parallel_config keys a resumed run must share with the run that saved (what each rank holds)
RESUME_KEYS = ("data_parallel", "model_parallel", "pipeline_stage", "context_parallel", "expert_parallel", "offset",
               "optimizer_shard")
