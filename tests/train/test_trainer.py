"""The train step: gradient accumulation, O1/O2, recompute, injected gradient sync, dynamic scaling."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from mindport.train.config import TrainConfig
from mindport.train.data import Loader, PackedDataset
from testkit.train import SEQ, tiny_model


def _config(**changes):
    values = dict(batch_size=2, seq_length=SEQ, train_steps=20, learning_rate=3e-3, min_learning_rate=3e-4,
                  warmup_steps=2)
    values.update(changes)
    return TrainConfig(**values)


def _batches(data_dir, count, size=2, seed=0):
    loader = Loader(PackedDataset(data_dir), size, seed)
    return [loader.next_batch() for _ in range(count)]


def test_accumulating_two_micro_batches_equals_one_batch_of_two(data_dir):
    from mindport.train.trainer import Trainer

    batches = _batches(data_dir, 3)
    whole = Trainer(tiny_model(), _config(batch_size=2))
    split = Trainer(tiny_model(), _config(batch_size=1, grad_accumulation=2))
    for batch in batches:
        a = whole.train_step([batch])
        b = split.train_step([batch.rows(slice(0, 1)), batch.rows(slice(1, 2))])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = whole.fp32_weights(), split.fp32_weights()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], atol=2e-5, err_msg=name)


def test_o1_and_recompute_against_o0(data_dir):
    """One O0 step as the reference for: O1 (close, not equal), recompute (equal), and an injected
    grad_sync / loss_reduce that run inside the compiled step. Then O1 keeps training."""
    from mindport.train.trainer import Trainer

    batch = _batches(data_dir, 1)[0]
    base = Trainer(tiny_model(), _config(grad_clip=0.0)).train_step([batch])

    o1 = Trainer(tiny_model(), _config(grad_clip=0.0, amp_level="O1"))
    cells = dict(o1.model.cells_and_names())
    assert type(cells["layers.0.attn.q_proj"].matmul).__name__ == "LowPrecisionMatMul"
    assert all(p.dtype == ms.float32 for p in o1.params)
    first = o1.train_step([batch])
    assert first["loss"] == pytest.approx(base["loss"], rel=2e-3) and first["loss"] != base["loss"]
    losses = [o1.train_step([batch])["loss"] for _ in range(10)]
    assert losses[-1] < first["loss"] - 1.0, losses

    again = Trainer(tiny_model(), _config(grad_clip=0.0, recompute=True))
    assert again.recomputed_layers == 2
    m = again.train_step([batch])
    assert m["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert m["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)



def test_o2_fp16_weights_fp32_norms_and_masters_and_loss_falls(data_dir):
    from mindport.train.trainer import Trainer

    trainer = Trainer(tiny_model(), _config(amp_level="O2", loss_scale=1024.0))
    params = dict(trainer.model.parameters_and_names())
    assert params["layers.0.attn.q_proj.weight"].dtype == ms.float16 and params["embed.weight"].dtype == ms.float16
    assert params["layers.0.attn_norm.weight"].dtype == ms.float32 and params["final_norm.weight"].dtype == ms.float32
    assert all(m.dtype == ms.float32 for m in trainer.masters.values())
    assert len(trainer.masters) == sum(p.dtype == ms.float16 for p in params.values())
    batch = _batches(data_dir, 1)[0]
    losses = [trainer.train_step([batch])["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 1.0, losses
    w = trainer.fp32_weights()["layers.0.mlp.up_proj.weight"]  # the fp16 weights are the rounded masters
    np.testing.assert_array_equal(params["layers.0.mlp.up_proj.weight"].asnumpy(), w.astype(np.float16))


def test_dynamic_loss_scale_skips_overflowing_steps(data_dir):
    from mindport.train.trainer import Trainer

    batch = _batches(data_dir, 1)[0]
    trainer = Trainer(tiny_model(), _config(amp_level="O2", loss_scale=2.0**40, loss_scale_type="dynamic",
                                            loss_scale_window=2))
    before = trainer.fp32_weights()
    m = trainer.train_step([batch])
    assert not m["finite"] and m["loss_scale"] == 2.0**39
    after = trainer.fp32_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # step skipped
    assert float(trainer.optimizer.step.asnumpy()) == 0
    for _ in range(40):
        m = trainer.train_step([batch])
        if m["finite"]:
            break
    assert m["finite"] and m["loss_scale"] < 2.0**24


def test_packed_sft_steps_take_each_batch_mask_and_weight_micro_batches_by_tokens(sft_dir):
    """Per step, the compiled step's loss is the model's masked loss of that batch's packed rows (a
    mask cached from an earlier batch would differ); micro-batches holding different numbers of
    supervised tokens accumulate to exactly the step on the whole batch."""
    from mindspore import Tensor

    from mindport.train.trainer import Trainer

    batches = _batches(sft_dir, 3, size=4, seed=1)
    assert all(b.segment_ids.max() > 1 for b in batches)
    whole = Trainer(tiny_model(), _config(batch_size=4))
    split = Trainer(tiny_model(), _config(batch_size=2, grad_accumulation=2))
    model = whole.model
    for batch in batches:
        counts = [(batch.labels[rows, 1:] != -100).sum() for rows in (slice(0, 2), slice(2, 4))]
        assert counts[0] != counts[1]
        logits = model.forward(*model.prepare(batch.input_ids, segment_ids=batch.segment_ids)[:4])[0]
        expected = float(model.loss_fn(logits, Tensor(batch.labels)).asnumpy())
        a = whole.train_step([batch])
        b = split.train_step([batch.rows(slice(0, 2)), batch.rows(slice(2, 4))])
        assert a["loss"] == pytest.approx(expected, rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    wa, wb = whole.fp32_weights(), split.fp32_weights()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], atol=2e-5, err_msg=name)
