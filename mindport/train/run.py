"""The training job: a :class:`~mindport.train.config.RunConfig` in, checkpoints and metrics out.

    data (prepared dir) -> Loader -> Trainer.train_step -> RunLogger
                                           '-> CheckpointManager every save_steps and at the end

``resume=True`` continues from the newest complete checkpoint in ``OUTPUT_DIR/checkpoints``:
weights, AdamW moments and step, loss scale, LR step and data position are restored, so the
steps that follow are the ones an uninterrupted run would have taken. The output directory's
rules (one run at a time, ``overwrite``) are :mod:`mindport.train.run_dir`'s.

SIGINT or SIGTERM stops the run after the current step (every rank after the same one) with a
checkpoint; a second signal stops it at once.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindport.config import ConfigError
from mindport.train.checkpoint import STOP_SIGNALS, CheckpointManager, agreed_stop, together
from mindport.train.config import TRAINING_MODEL_KEYS, RunConfig
from mindport.train.data import Loader, PackedDataset
from mindport.train.mixture import Mixture, MixtureLoader
from mindport.train.flops import measure_matmul_flops, train_flops_per_token
from mindport.train.logger import RunLogger
from mindport.train.run_dir import RunDirectory
from mindport.train.trainer import CONTEXT_PARALLEL_SEGMENTS, Trainer


@dataclass
class TrainResult:
    steps: int  # optimiser steps completed in total (including resumed ones)
    first_loss: float | None  # loss of the first step this call ran
    last_loss: float | None
    checkpoint: str | None
    seconds: float
    plot: str | None
    output_dir: str
    stopped_by: int | None = None  # the signal (SIGINT/SIGTERM) that stopped the run early


class StopRequest:
    """Catches SIGINT/SIGTERM while the run lasts (main thread only): the first sets ``signum``, for
    the training loop to stop after the current step; a second gets the signal's default action."""

    def __init__(self, echo=print):
        self.signum: int | None = None
        self.echo = echo
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def rearm(self) -> None:
        """Put our handlers back: every compiled graph run installs MindSpore's C-level SIGINT handler
        (which reports SIGTERM) behind Python's back, so the loop calls this after every step. A Ctrl-C
        landing inside a compiled step is still reported as SIGTERM (the run stops all the same)."""
        if self._previous and self.signum is None:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum
        self.echo(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (again to stop now)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    ms.set_seed(seed)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": repr(random.getstate()), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def _set_rng_state(state: dict) -> None:
    import ast

    if "python" in state:
        random.setstate(ast.literal_eval(state["python"]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def build_model(run: RunConfig):
    """The model of this rank under the registered layout: ``load_checkpoint``'s weights (its slices)
    with ``run.model``'s training keys, else weights drawn from ``seed`` (the same model under any layout);
    with ``pet_config``, LoRA adapters on it and the rest frozen."""
    model = _base_model(run)
    if run.lora is not None:
        from mindport.models.lora import apply_lora

        apply_lora(model, run.lora, run.train.seed)
    return model


def _base_model(run: RunConfig):
    from mindport.models.auto import AutoModelForCausalLM

    path = run.train.load_checkpoint
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, **{k: getattr(run.model, k) for k in TRAINING_MODEL_KEYS})
        for key, value in dataclasses.asdict(run.model).items():  # load_yaml takes the architecture from there
            if getattr(model.config, key) != value:
                raise ConfigError(f"load_checkpoint = {path!r}: key '{key}' = {getattr(model.config, key)!r}, the "
                                  f"run's model config has {value!r}")
        return model
    model = AutoModelForCausalLM.from_config(run.model)
    model.init_weights(run.train.seed)
    return model


def open_dataset(run: RunConfig, context_parallel: int) -> PackedDataset | Mixture:
    """The run's data (one prepared directory or a mixture), checked against the model's vocabulary, the
    sequence length and ``context_parallel``; the command line checks it before the ranks join."""
    cfg = run.train
    if not cfg.data_dir and not cfg.data_dirs:
        raise ConfigError("train_dataset.data_dir: not set (point it at a `mindport data prepare` output, "
                          "e.g. --set train_dataset.data_dir=DIR, or give a mixture in train_dataset.data_dirs)")
    dataset = PackedDataset(cfg.data_dir) if cfg.data_dir else Mixture(cfg.data_dirs)
    dataset.check(cfg.seq_length, run.model.vocab_size)
    if dataset.has_segments and context_parallel > 1:
        raise ConfigError(f"{cfg.data_dir or 'train_dataset.data_dirs'}: {CONTEXT_PARALLEL_SEGMENTS}")
    return dataset


def train(run: RunConfig, resume: bool = False, stop_after: int | None = None, model=None,
          progress: bool | None = None, echo=print, overwrite: bool = False) -> TrainResult:
    """Train ``run`` under the registered process groups (:func:`mindport.parallel.state.init_parallel`);
    ``stop_after`` ends this call after that many total steps (the LR schedule still spans
    ``train_steps``), e.g. to resume later; ``overwrite`` deletes a previous run's files in the
    output directory first. Rank 0 locks the output directory, logs and writes the run's files."""
    from mindport.parallel.state import current

    cfg = run.train
    start_time = time.perf_counter()
    groups = model.groups if model is not None else current()
    dataset = open_dataset(run, groups.cp.size)
    lead = groups.global_rank == 0
    if not lead:
        echo, progress = (lambda *_: None), False
    run_dir = RunDirectory(cfg.output_dir)
    together(groups, f"{cfg.output_dir}: taking the output directory",
             lambda: lead and run_dir.open(resume, overwrite, echo))
    with run_dir, StopRequest(echo) as stop:
        seed_everything(cfg.seed)
        tokenizer = None
        if dataset.tokenizer_dir:
            from mindport.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(dataset.tokenizer_dir)
        model = model if model is not None else build_model(run)
        trainer = Trainer(model, cfg)
        # data parallel: every rank draws the same global batch and keeps its own rows of it
        per_rank, dp = trainer.rows_per_step, groups.dp.size
        loader = (Loader if cfg.data_dir else MixtureLoader)(dataset, per_rank * dp, cfg.seed)
        rows = slice(groups.dp.rank * per_rank, (groups.dp.rank + 1) * per_rank)
        ckpts = CheckpointManager(run_dir.checkpoints, cfg.keep_checkpoints, groups, trainer.optimizer.sharded_state,
                                  cfg.load_checkpoint, model.lora, model.config)
        together(groups, f"{cfg.output_dir}: deleting the previous run", lambda: lead and run_dir.delete_previous_run(echo))

        if resume:
            path = ckpts.latest()
            if path is None:
                echo(f"resume: no checkpoint in {ckpts.directory}; starting at step 0")
            else:
                ckpts.together(f"{path}: resuming", lambda: restore(trainer, loader, ckpts, path))
                echo(f"resume: continuing from {path} (step {trainer.step}, {loader.consumed} samples consumed)")

        if stop_after is not None and stop_after < trainer.step:
            raise ConfigError(f"--stop-after = {stop_after}: expected at least the step resumed from "
                              f"({trainer.step}) in {ckpts.directory}")
        start, end = trainer.step, cfg.train_steps if stop_after is None else min(stop_after, cfg.train_steps)
        fpt = train_flops_per_token(run.model, cfg.seq_length)
        world = len(groups.world.ranks)
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else measure_matmul_flops()
        logger = RunLogger(cfg.output_dir, cfg.train_steps, trainer.step, cfg.log_steps, fpt, peak * world, progress,
                           echo=echo) if lead else None
        from mindport.train.memory import format_memory_report, memory_report

        echo(format_memory_report(memory_report(model.config, groups.config, cfg.batch_size, cfg.seq_length,
                                                cfg.amp_level, cfg.recompute, rank=groups.global_rank,
                                                pipeline_offset=groups.config.offset, lora=model.lora)))
        echo(f"training: {run.model.num_parameters() / 1e6:.2f}M parameters, {cfg.amp_level}, {world} process(es), "
             f"{per_rank * dp}x{cfg.grad_accumulation} x {cfg.seq_length} tokens/step, steps {trainer.step}->{end} "
             f"of {cfg.train_steps}, {'compiled' if trainer.compiled else 'eager'}; MFU vs "
             f"{'stated' if cfg.peak_tflops else 'measured MindSpore fp32 matmul'} peak {peak / 1e9:.1f} GFLOP/s")

        first = last = saved = None
        stopped = agreed_stop(groups, stop.signum)
        try:
            while trainer.step < end and stopped is None:
                t0 = time.perf_counter()
                micro = [loader.next_batch().rows(rows) for _ in range(cfg.grad_accumulation)]
                metrics = trainer.train_step(micro)
                stop.rearm()
                metrics["epoch"] = round(loader.epoch, 4)
                if logger:
                    logger.log(metrics, run.tokens_per_step, time.perf_counter() - t0)
                first = metrics["loss"] if first is None else first
                last = metrics["loss"]
                if cfg.save_steps and trainer.step % cfg.save_steps == 0:
                    saved = save(trainer, loader, ckpts, tokenizer, last)
                stopped = agreed_stop(groups, stop.signum)
            if trainer.step > start and saved != ckpts.path(trainer.step):
                saved = save(trainer, loader, ckpts, tokenizer, last)
        finally:
            plot = logger.close() if logger else None
        checkpoint = saved or ckpts.latest()
        if stopped is not None:
            echo(f"{signal.Signals(stopped).name}: stopped after step {trainer.step}; checkpoint {checkpoint} "
                 f"(continue with --resume)")
    return TrainResult(trainer.step, first, last, checkpoint, time.perf_counter() - start_time, plot, cfg.output_dir,
                       stopped)


def save(trainer: Trainer, loader: Loader, ckpts: CheckpointManager, tokenizer, loss) -> str:
    weights = trainer.fp32_weights()  # a collective under ZeRO + O2: every rank saves
    arrays = {name: p.asnumpy() for name, p in trainer.state_tensors().items()}
    arrays["rng.mindspore"] = ms.get_rng_state().asnumpy()
    state = {"step": trainer.step, "lr_next": trainer.lr(), "loss": loss, "data": loader.state_dict(),
             "rng": _rng_state(), "amp_level": trainer.level, "train_config": trainer.config.to_dict(),
             "parallel": dataclasses.asdict(trainer.groups.config)}
    return ckpts.save(trainer.step, trainer.base_config, weights, arrays, state, tokenizer)


def restore(trainer: Trainer, loader: Loader, ckpts: CheckpointManager, path: str) -> None:
    from mindport.checkpoint.safetensors_io import CheckpointError

    weights, arrays, state = ckpts.load(path)
    weights_file, state_file = ckpts.files(path)
    trainer.load_fp32_weights(weights, weights_file)
    for name, param in trainer.state_tensors().items():
        if name not in arrays:
            if name == "loss_scale.counter":
                continue  # a static-scale checkpoint resumed with a dynamic scaler: counter starts at 0
            raise CheckpointError(f"{state_file}: missing tensor '{name}'")
        param.set_data(Tensor(arrays[name]).astype(param.dtype))
    if "rng.mindspore" in arrays:
        ms.set_rng_state(Tensor(arrays["rng.mindspore"]))
    trainer.step = int(state["step"])
    loader.load_state_dict(state["data"])
    _set_rng_state(state.get("rng", {}))
