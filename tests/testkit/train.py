"""The tiny training setup shared by the training tests: sizes, a 2-layer TeleChat2 config, run configs."""
from __future__ import annotations

SEQ = 32
VOCAB = 512


def tiny_model_config(**changes):
    from mindport import AutoConfig

    return AutoConfig.from_preset("telechat2-tiny-gqa", vocab_size=VOCAB, **changes)


def run_config(output_dir: str, data_dir: str, **train):
    from mindport.train.config import RunConfig
    from mindport.train.config import TrainConfig

    values = dict(seed=0, output_dir=output_dir, batch_size=2, seq_length=SEQ, train_steps=6, learning_rate=3e-3,
                  min_learning_rate=3e-4, warmup_steps=2, data_dir=data_dir, peak_tflops=1.0, keep_checkpoints=2)
    values.update(train)
    return RunConfig(tiny_model_config(), train=TrainConfig(**values))


def tiny_model(seed: int = 0):
    import mindspore as ms

    from mindport import AutoModelForCausalLM

    ms.set_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config())


def assert_resumed_equals_straight(straight_dir: str, split_dir: str, straight_ckpt: str, split_ckpt: str,
                                   manager) -> tuple[tuple, tuple]:
    """A run stopped and resumed (``split_dir``) equals the uninterrupted one: per-step loss, gradient
    norm and LR, and every weight and optimizer tensor of the final checkpoints, bit for bit.
    ``manager``: a CheckpointManager that reads them. Returns both checkpoints' (weights, arrays, state)."""
    import numpy as np

    from mindport.train.logger import read_metrics

    a, b = read_metrics(straight_dir), read_metrics(split_dir)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_array_equal([m[key] for m in b], [m[key] for m in a], err_msg=key)
    (wa, oa, sa), (wb, ob, sb) = manager.load(straight_ckpt), manager.load(split_ckpt)
    assert set(wa) == set(wb) and set(oa) == set(ob)
    for name in wa:
        np.testing.assert_array_equal(wb[name], wa[name], err_msg=name)
    for name in oa:
        if not name.startswith("rng."):
            np.testing.assert_array_equal(ob[name], oa[name], err_msg=name)
    return (wa, oa, sa), (wb, ob, sb)
