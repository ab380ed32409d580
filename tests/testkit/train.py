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
