"""The MoE training step compiles: one ms.jit graph for forward, backward, clipping and AdamW, equal to
the eager step, with no host read per layer (only the step's four metrics and one (L, E + 1) expert load are read)."""
import mindspore as ms
import numpy as np
import pytest

from mindport import AutoModelForCausalLM
from mindport.train.config import TrainConfig
from mindport.train.data import Batch
from mindport.train.trainer import Trainer

CASES = {
    "mixtral": ("mixtral-tiny", {}),
    "qwen_moe_shared_expert": ("qwen-moe-tiny", {}),
    "xverse_moe_capacity_drops": ("xverse-moe-tiny", {"capacity_factor": 1.0, "initializer_range": 0.15}),
}


def trainer(preset: str, overrides: dict, jit: bool) -> Trainer:
    ms.set_seed(0)
    model = AutoModelForCausalLM.from_preset(preset, vocab_size=256, **overrides)
    return Trainer(model, TrainConfig(batch_size=2, seq_length=16, train_steps=4, learning_rate=3e-3,
                                      warmup_steps=1, jit=jit))


@pytest.mark.parametrize("case", CASES)
def test_moe_step_is_one_compiled_graph_equal_to_the_eager_step(case, monkeypatch):
    preset, overrides = CASES[case]
    ids = np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32)
    batch = Batch(ids, ids.copy())
    eager, compiled = trainer(preset, overrides, jit=False), trainer(preset, overrides, jit=True)
    assert compiled.compiled and not eager.compiled
    a, b = eager.train_step([batch]), compiled.train_step([batch])
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    wa, wb = eager.fp32_weights(), compiled.fp32_weights()
    # AdamW's first step moves each weight by lr * g / (|g| + eps): ~lr, but less where |g| is near eps (1e-8),
    # and there the gradients' fp32 rounding (the two graphs sum in different orders) moves the update by up
    # to ~0.5% of lr (measured 1.3e-5 at lr 3e-3 on one element); a wrong step is off by ~lr on most weights
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], atol=1e-2 * eager.config.learning_rate, err_msg=name)

    reads = []
    asnumpy = ms.Tensor.asnumpy
    monkeypatch.setattr(ms.Tensor, "asnumpy", lambda self: reads.append(self.shape) or asnumpy(self))
    compiled.train_step([batch])
    assert len(reads) == 5, f"host reads in one step: {reads} (expected the 4 metrics and the expert load only)"
    assert reads[-1] == (compiled.base_config.num_layers, compiled.base_config.num_experts + 1)


def test_router_loss_of_a_packed_step_ignores_what_the_padding_holds():
    """Padding (segment 0, labels ignored) changes neither the loss nor the gradient of a compiled step:
    the router statistics skip it as transformers' load_balancing_loss_func skips attention_mask 0."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, (2, 17)).astype(np.int32)
    segments = np.zeros((2, 17), np.int32)
    segments[0, :9], segments[0, 9:13], segments[1, :15] = 1, 2, 1  # two sequences + padding, one + padding
    labels = np.where(segments > 0, ids, -100).astype(np.int32)
    other_padding = np.where(segments > 0, ids, rng.integers(0, 256, ids.shape)).astype(np.int32)
    ms.set_seed(0)
    model = AutoModelForCausalLM.from_preset("mixtral-tiny", vocab_size=256, router_aux_loss_coef=0.5,
                                             router_z_loss_coef=0.1)  # large: the router terms show
    one = Trainer(model, TrainConfig(batch_size=2, seq_length=16, train_steps=2, learning_rate=1e-30,
                                     min_learning_rate=0.0, warmup_steps=1))  # a step moves no fp32 weight
    steps = [one.train_step([Batch(x, labels, segments)]) for x in (ids, other_padding)]
    assert steps[1]["loss"] == pytest.approx(steps[0]["loss"], rel=1e-6)
    assert steps[1]["grad_norm"] == pytest.approx(steps[0]["grad_norm"], rel=1e-5)
    assert sum(map(sum, steps[0]["expert_load"][0:1])) == 17 * 2 * 2  # the load still counts every routed slot
