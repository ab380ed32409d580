"""Per-step metrics to the console, ``metrics.jsonl``, TensorBoard and, at the end, a loss-curve PNG
(and for MoE models an expert-load heatmap PNG)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from mindport.train.plot import expert_load_png, loss_curve_png
from mindport.train.tensorboard import EventWriter

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
EXPERT_LOAD_PLOT_FILE = "expert_load.png"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLogger:
    """``log(metrics)`` once per optimiser step; ``close()`` writes the loss-curve PNG and, when the
    metrics carry ``expert_load`` (MoE), the heatmap of the expert load summed over the logged steps.

    On resume, lines of ``metrics.jsonl`` past the resumed step (logged after the checkpoint,
    before the interruption) are dropped, so the file holds each step once.
    """

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, log_every: int = 1,
                 flops_per_token: float = 0.0, peak_flops: float = 0.0, progress: bool | None = None,
                 tensorboard: bool = True, echo=print):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir, self.total, self.log_every = output_dir, total_steps, log_every
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.echo = echo
        kept = [m for m in read_metrics(output_dir) if m.get("step", 0) <= start_step] if start_step else []
        self.path = os.path.join(output_dir, METRICS_FILE)
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
        self._f = open(self.path, "a", encoding="utf-8")
        self.history = [(m["step"], m["loss"]) for m in kept]
        loads = [np.asarray(m["expert_load"], np.float64) for m in kept if "expert_load" in m]
        self.expert_load = np.sum(loads, 0) if loads else None  # (L, E) over the logged steps (MoE)
        self.tb = EventWriter(os.path.join(output_dir, TENSORBOARD_DIR)) if tensorboard else None
        self._window: list[float] = []
        self.bar = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.echo(line)

    def log(self, metrics: dict, tokens: int, seconds: float) -> dict:
        tps = tokens / seconds if seconds > 0 else 0.0
        record = dict(metrics)
        record["tokens_per_s"] = tps
        record["step_time_s"] = seconds
        if self.flops_per_token:
            record["flops_per_s"] = tps * self.flops_per_token
            if self.peak:
                record["mfu"] = record["flops_per_s"] / self.peak
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.history.append((record["step"], record["loss"]))
        if self.tb is not None:
            scalars = {f"train/{k}": float(record[k]) for k in
                       ("loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "mfu") if k in record}
            for key in ("expert_load_imbalance", "dropped_slots"):  # one scalar per MoE layer
                scalars.update({f"moe/{key}/layer_{i}": float(v) for i, v in enumerate(record.get(key, ()))})
            self.tb.add_scalars(record["step"], scalars)
            self.tb.flush()
        if "expert_load" in record:
            load = np.asarray(record["expert_load"], np.float64)
            self.expert_load = load if self.expert_load is None else self.expert_load + load
        step = record["step"]
        self._window.append(record["loss"])
        if step % self.log_every == 0 or step == self.total or step == 1:
            count, mean = len(self._window), sum(self._window) / len(self._window)
            self._window = []
            line = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {record['loss']:.4f} "
                    f"(mean of last {count}: {mean:.4f}) | "
                    f"lr {record['lr']:.2e} | grad_norm {record['grad_norm']:.3f} | "
                    f"loss_scale {record['loss_scale']:g} | {tps:,.0f} tok/s")
            if "mfu" in record:
                line += f" | MFU {100 * record['mfu']:.1f}%"
            if not record.get("finite", True):
                line += " | OVERFLOW (non-finite gradients)"
            self._say(line)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        return record

    def close(self) -> str | None:
        if self.bar is not None:
            self.bar.close()
        self._f.close()
        if self.tb is not None:
            self.tb.close()
        if not self.history:
            return None
        steps, losses = zip(*self.history)
        path = os.path.join(self.output_dir, PLOT_FILE)
        loss_curve_png(path, steps, losses)
        if self.expert_load is not None:
            expert_load_png(os.path.join(self.output_dir, EXPERT_LOAD_PLOT_FILE), self.expert_load)
        return path
