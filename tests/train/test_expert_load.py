"""MoE balancing and visibility: the per-layer expert load the training step reports (against a numpy count
of the router's choices), the aux-loss scope over data-parallel ranks, and the heatmap of a `mindport train` run."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import nn

from mindport import AutoModelForCausalLM
from mindport.config import ConfigError
from mindport.train.config import TrainConfig
from mindport.train.data import Batch
from mindport.train.tensorboard import read_records
from mindport.train.trainer import Trainer
from testkit.train import SEQ, VOCAB


class RecordLogits(nn.Cell):
    """Wraps a router Linear and keeps the logits it returns."""

    def __init__(self, router, seen: list):
        super().__init__()
        self.router, self.seen = router, seen

    def construct(self, x):
        logits = self.router(x)
        self.seen.append(logits.asnumpy())
        return logits


def tiny_moe():
    ms.set_seed(0)
    return AutoModelForCausalLM.from_preset("xverse-moe-tiny", vocab_size=256, capacity_factor=1.0,
                                            initializer_range=0.15)


def test_step_reports_the_expert_load_of_a_numpy_count_of_the_router_choices():
    recorded, model = tiny_moe(), tiny_moe()  # the same weights: one records its routers' logits, one trains
    c = model.config
    ids = np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32)
    seen = []
    for layer in recorded.layers.values():
        layer.mlp.router = RecordLogits(layer.mlp.router, seen)
    recorded.forward(*recorded.prepare(ids))
    capacity = int(np.ceil(c.capacity_factor * ids.size * c.moe_top_k / c.num_experts))
    tokens, dropped = [], []
    for logits in seen:  # (T, E) per layer; top-k of the logits = top-k of the softmax
        chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :c.moe_top_k]
        count = np.bincount(chosen.ravel(), minlength=c.num_experts)
        tokens.append(count.tolist())
        dropped.append(int(np.maximum(count - capacity, 0).sum()))
    assert len(tokens) == c.num_layers and sum(dropped) > 0  # capacity drops some slots

    trainer = Trainer(model, TrainConfig(batch_size=2, seq_length=16, train_steps=2, learning_rate=1e-3,
                                         warmup_steps=1, jit=True))
    metrics = trainer.train_step([Batch(ids, ids.copy())])
    counts = np.array(tokens, np.float64)
    assert metrics["expert_load"] == tokens and metrics["dropped_slots"] == dropped
    np.testing.assert_allclose(metrics["expert_load_imbalance"], counts.max(1) / counts.mean(1), rtol=1e-4)
    accumulating = Trainer(tiny_moe(), trainer.config)  # two micro-batches: their loads add up
    metrics = accumulating.train_step([Batch(ids, ids.copy())] * 2)
    assert metrics["expert_load"] == (2 * counts).astype(int).tolist() and metrics["dropped_slots"] == [2 * d for d in dropped]


def test_z_loss_coefficient_weighs_switch_transformers_router_z_loss_pooled_over_layers():
    import torch
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    ms.set_seed(0)
    model = AutoModelForCausalLM.from_preset("mixtral-tiny", router_aux_loss_coef=0.0, router_z_loss_coef=0.25)
    seen = []
    for layer in model.layers.values():
        layer.mlp.router = RecordLogits(layer.mlp.router, seen)
    ids = np.random.default_rng(3).integers(0, 256, (2, 9))
    router_loss = model.forward(*model.prepare(ids))[1]
    theirs = np.mean([float(router_z_loss_func(torch.from_numpy(logits).reshape(2, 9, -1))) for logits in seen])
    assert len(seen) == model.config.num_layers
    assert float(router_loss.asnumpy()) == pytest.approx(0.25 * theirs, rel=1e-5)


class FakeDataComm:
    """The other rank of a data-parallel group of two: ``all_reduce`` adds its contributions, in call
    order (its counted tokens, then its fractions times them)."""

    def __init__(self, *contributions):
        self.contributions, self.group = list(contributions), type("Group", (), {"size": 2})()

    def all_reduce(self, x):
        return x + ms.Tensor(self.contributions.pop(0))


@pytest.mark.parametrize("scope, padded", [("global_batch", False), ("global_batch", True), ("micro_batch", True)])
def test_router_aux_loss_scope_sums_the_fractions_over_ranks_or_not(scope, padded):
    """This rank counts 6 of its 8 tokens when ``padded`` (the other rank 2): the global-batch f and this
    rank's share of the loss weigh the ranks by their counted tokens, the micro-batch scope by rank."""
    model = AutoModelForCausalLM.from_preset("mixtral-tiny", router_aux_loss_coef=1.0, router_z_loss_coef=0.0,
                                             router_aux_loss_scope=scope)
    f, p = np.array([0.5, 1.0, 0.25, 0.25], np.float32), np.array([0.1, 0.4, 0.3, 0.2], np.float32)
    other_f = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
    stats = (ms.Tensor(f), ms.Tensor(p), ms.Tensor(0.0, ms.float32), ms.Tensor(0, ms.int32), ms.Tensor(f * 8))
    token_mask = ms.Tensor(np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.float32)) if padded else None
    mine, other = (6.0, 2.0) if padded and scope == "global_batch" else (1.0, 1.0)
    model.data_comms = [FakeDataComm(np.float32(other), other_f * other)]
    used_f = (mine * f + other * other_f) / (mine + other) if scope == "global_batch" else f
    expected = 4 * float((used_f * p).sum()) * mine / (mine + other)  # this rank's share of the batch loss
    assert float(model.router_loss([stats], token_mask).asnumpy()) == pytest.approx(expected, rel=1e-6)


def test_router_aux_loss_scope_is_checked():
    with pytest.raises(ConfigError, match="key 'router_aux_loss_scope' = 'batch': expected global_batch or micro_batch"):
        AutoModelForCausalLM.from_preset("mixtral-tiny", router_aux_loss_scope="batch")


def test_mindport_train_on_a_tiny_moe_writes_the_load_metrics_and_heatmap(tmp_path, data_dir):
    out = str(tmp_path / "run")
    doc = yaml.safe_load(open("configs/telechat2/tiny_train.yaml"))
    doc["model"]["model_config"] = {"preset": "mixtral-tiny", "vocab_size": VOCAB, "capacity_factor": 1.0}
    doc.update(output_dir=out, train_dataset={"data_dir": data_dir})
    doc["lr_schedule"]["total_steps"] = 2
    doc["runner_config"].update(batch_size=2, seq_length=SEQ)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "mindport.cli", "train", "--config", str(config), "--no-progress"],
                          capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    layers, experts = 2, 4
    for record in records:
        load = np.array(record["expert_load"])
        assert load.shape == (layers, experts) and (load.sum(1) == 2 * SEQ * 2).all()  # every slot of top-2
        assert len(record["expert_load_imbalance"]) == len(record["dropped_slots"]) == layers
    tb_dir = os.path.join(out, "tensorboard")
    events = b"".join(read_records(os.path.join(tb_dir, os.listdir(tb_dir)[0])))
    assert all(f"moe/{key}/layer_{i}".encode() in events
               for key in ("expert_load_imbalance", "dropped_slots") for i in range(layers))
    with open(os.path.join(out, "expert_load.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))


def test_heatmap_sums_the_expert_load_over_the_steps_of_a_resumed_run(tmp_path):
    from mindport.train.logger import RunLogger

    out = str(tmp_path)
    step = {"lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0, "expert_load_imbalance": [1.5], "dropped_slots": [0]}
    first = RunLogger(out, 2, progress=False, echo=lambda s: None)
    first.log(dict(step, step=1, loss=2.0, expert_load=[[3, 1]]), 8, 1.0)
    first.close()
    resumed = RunLogger(out, 2, start_step=1, progress=False, echo=lambda s: None)
    resumed.log(dict(step, step=2, loss=1.5, expert_load=[[2, 2]]), 8, 1.0)
    assert resumed.expert_load.tolist() == [[5, 3]]
    resumed.close()
    assert os.path.isfile(os.path.join(out, "expert_load.png"))
