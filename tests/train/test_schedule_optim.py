"""Learning-rate schedule values and AdamW against torch.optim.AdamW."""
import math

import numpy as np
import pytest

from mindport.train.optim import lr_at


def test_warmup_is_linear_to_peak():
    assert [lr_at(s, 1.0, 0.1, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decays_from_peak_to_min():
    peak, low, warm, total = 2e-3, 1e-4, 10, 110
    assert lr_at(warm, peak, low, warm, total) == pytest.approx(peak)
    assert lr_at(warm + 50, peak, low, warm, total) == pytest.approx((peak + low) / 2)
    assert lr_at(warm + 25, peak, low, warm, total) == pytest.approx(low + 0.5 * (peak - low) * (1 + math.cos(math.pi / 4)))
    assert lr_at(total, peak, low, warm, total) == pytest.approx(low)
    assert lr_at(total + 7, peak, low, warm, total) == pytest.approx(low)  # stays at the floor
    values = [lr_at(s, peak, low, warm, total) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup():
    assert lr_at(0, 1.0, 0.0, 0, 10) == 1.0


def test_adamw_matches_torch_with_and_without_decay():
    import mindspore as ms
    import torch
    from mindspore import Parameter, Tensor

    from mindport.train.optim import AdamW

    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ours = [Parameter(Tensor(a.copy()), name=f"w{i}") for i, a in enumerate(init)]
    opt = AdamW(ours, [True, False], 0.9, 0.95, 1e-8, 0.1)

    @ms.jit
    def step(g, lr):
        return opt(g, lr)

    theirs = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    topt = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.1}, {"params": [theirs[1]], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for k in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        lr = 1e-2 * (k + 1) / 4
        for group in topt.param_groups:
            group["lr"] = lr
        step(tuple(Tensor(g) for g in grads), Tensor(lr, ms.float32))
        for p, g in zip(theirs, grads):
            p.grad = torch.tensor(g)
        topt.step()
        for p, q in zip(ours, theirs):
            np.testing.assert_allclose(p.asnumpy(), q.detach().numpy(), atol=1e-6)
    assert float(opt.step.asnumpy()) == 4


def test_norms_and_biases_are_not_decayed():
    from testkit.train import tiny_model

    from mindport.train.optim import no_decay_names

    model = tiny_model()
    exempt = no_decay_names(model)
    names = [n for n, _ in model.parameters_and_names()]
    assert exempt == {n for n in names if "norm" in n or n.endswith("bias")}
    assert "layers.0.attn.o_proj.bias" in exempt and "final_norm.weight" in exempt


@pytest.mark.parametrize("preset", ["telechat2-tiny-gqa", "xverse-moe-tiny", "qwen-moe-tiny"])
def test_slicing_rules_flag_exactly_the_norm_weights(preset):
    """AMP O2, the memory report and weight decay read "is this a norm" from the slicing table."""
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.parallel.sharding import is_norm
    from mindport.transformer.layers import RMSNorm

    model = AutoModelForCausalLM.from_preset(preset)
    norms = {f"{cell_name}.weight" for cell_name, cell in model.cells_and_names() if isinstance(cell, RMSNorm)}
    assert norms and {n for n, _ in model.parameters_and_names() if is_norm(n)} == norms
