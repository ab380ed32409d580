"""LoRA fine-tuning, one process: frozen base, adapter-only optimizer state and checkpoints (PEFT
format), exact resume, pet_config errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from mindport.config import ConfigError, LoraConfig
from testkit.train import assert_resumed_equals_straight, run_config, tiny_model

TARGETS = ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "telechat")
    tiny_model(seed=1).save_pretrained(out)
    return out


def lora_run(output_dir, data_dir, base_dir, **train):
    run = run_config(output_dir, data_dir, load_checkpoint=base_dir, **train)
    run.lora = LoraConfig(lora_rank=4, lora_alpha=8.0, target_modules=TARGETS, modules_to_save=["lm_head"])
    return run


def test_lora_trains_only_the_adapter_and_leaves_the_base_bit_identical(tmp_path, data_dir, base_dir):
    from mindport import AutoModelForCausalLM
    from mindport.train.run import build_model, train

    run = lora_run(str(tmp_path / "run"), data_dir, base_dir, train_steps=3)
    model = build_model(run)
    trainable = {n for n, p in model.parameters_and_names() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.lora_{f}.weight" for i in range(2) for f in "AB"
                         for m in ("attn.q_proj", "attn.kv_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                   "mlp.down_proj")} | {"lm_head.weight"}
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    result = train(run, model=model, progress=False, echo=lambda s: None)
    after = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    for name in before:
        if name in trainable:
            assert not np.array_equal(after[name], before[name]), f"{name} did not train"
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # the checkpoint is a PEFT adapter directory; the optimizer state covers the trained tensors only
    files = set(os.listdir(result.checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    from mindport.train.checkpoint import read_safetensors

    state = read_safetensors(os.path.join(result.checkpoint, "train_state", "optimizer.safetensors"))
    assert {k.split(".", 1)[1] for k in state if k.startswith("exp_avg.")} == trainable
    ids = np.random.default_rng(0).integers(0, 512, (2, 16))
    reloaded = AutoModelForCausalLM.from_pretrained(base_dir, adapter=result.checkpoint)
    np.testing.assert_allclose(reloaded(ids).asnumpy(), model(ids).asnumpy(), atol=1e-6)
    with pytest.raises(ConfigError, match=r"a LoRA adapter \(adapter_config.json\), not a model: load its base"):
        AutoModelForCausalLM.from_pretrained(result.checkpoint)


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_lora_resume_continues_exactly(tmp_path, data_dir, base_dir, level):
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run import train

    n = 2
    extra = dict(train_steps=2 * n, save_steps=n, amp_level=level, loss_scale=1024.0 if level == "O2" else 1.0)
    straight = train(lora_run(str(tmp_path / "straight"), data_dir, base_dir, **extra), progress=False,
                     echo=lambda s: None)
    part = lora_run(str(tmp_path / "split"), data_dir, base_dir, **extra)
    train(part, stop_after=n, progress=False, echo=lambda s: None)
    second = train(part, resume=True, progress=False, echo=lambda s: None)
    ckpts = CheckpointManager(str(tmp_path), lora=part.lora, model_config=part.model)
    (wa, _, _), _ = assert_resumed_equals_straight(str(tmp_path / "straight"), str(tmp_path / "split"),
                                                   straight.checkpoint, second.checkpoint, ckpts)
    assert all(".lora_" in n or n == "lm_head.weight" for n in wa)


def test_pet_config_in_yaml(tmp_path, base_dir):
    from mindport.train.config import run_config_from_dict

    doc = {"load_checkpoint": base_dir, "model": {"model_config": {"pet_config": {
        "pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ".*query|.*dense",
        "modules_to_save": ["lm_head"]}}}}
    run = run_config_from_dict(doc, "c.yaml")
    assert run.lora.lora_rank == 8 and run.lora.scaling == 2.0 and run.lora.target_modules == ".*query|.*dense"
    doc["model"]["model_config"]["pet_config"]["target_modules"] = ["query", "wq"]
    with pytest.raises(ConfigError, match=r"^c.yaml: model.model_config.pet_config: key 'target_modules' = 'wq': "
                                          r"matches no module of this telechat2 model"):
        run_config_from_dict(doc, "c.yaml")
    doc["model"]["model_config"]["pet_config"] = {"pet_type": "prefix"}
    with pytest.raises(ConfigError, match=r"^c.yaml: model.model_config.pet_config: key 'pet_type' = 'prefix'"):
        run_config_from_dict(doc, "c.yaml")


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_memory_report_counts_trainable_and_frozen_bytes(tmp_path, data_dir, base_dir, level):
    from mindport.parallel.state import single_process
    from mindport.train.memory import memory_report
    from mindport.train.run import build_model
    from mindport.train.trainer import Trainer

    run = lora_run(str(tmp_path / "run"), data_dir, base_dir, amp_level=level, loss_scale=1024.0)
    trainer = Trainer(build_model(run), run.train)
    assert trainer.model.training  # LoRA dropout applies while training
    params = dict(trainer.model.parameters_and_names())
    trained = {n: p for n, p in params.items() if p.requires_grad}
    nbytes = {n: p.size * p.itemsize for n, p in params.items()}
    report = memory_report(run.model, single_process().config, 2, 32, level, lora=run.lora)["bytes"]
    assert report["parameters.trainable"] == sum(nbytes[n] for n in trained)
    assert report["parameters.frozen"] == sum(nbytes[n] for n in params if n not in trained) > 0
    elements = sum(p.size for p in trained.values())
    assert report["gradients"] == 4 * elements
    assert report["optimizer.adam_m"] == report["optimizer.adam_v"] == 4 * elements
    assert report["optimizer.master"] == sum(4 * m.size for m in trainer.masters.values())
    assert set(trainer.masters) == (set(trained) if level == "O2" else set())


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, base_dir):
    """(model with a random, trained-looking adapter, that adapter saved as a PEFT directory)."""
    from mindspore import Tensor

    from mindport import AutoModelForCausalLM
    from mindport.models.lora import apply_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(lora_rank=4, target_modules=TARGETS))
    rng = np.random.default_rng(0)
    for _, p in model.parameters_and_names():
        if p.requires_grad:
            p.set_data(Tensor(p.asnumpy() + 0.3 * rng.standard_normal(p.shape).astype(np.float32)))
    directory = str(tmp_path_factory.mktemp("adapter"))
    save_adapter(model, directory, overwrite=True)
    return model, directory


def test_generate_with_adapter(base_dir, tok_dir, adapted, capsys):
    from mindport.cli import main
    from mindport.tokenizer import Tokenizer

    model, adapter = adapted
    tok = Tokenizer.load(tok_dir)
    ids = tok.encode("The for statement")
    args = ["generate", "--load", base_dir, "--tokenizer", tok_dir, "--prompt", "The for statement", "--greedy",
            "--max-new-tokens", "8"]
    texts = []
    for extra in ([], ["--adapter", adapter]):
        capsys.readouterr()
        assert main(args + extra) == 0
        texts.append(capsys.readouterr().out.strip())
    out = [int(t) for t in model.generate(np.asarray([ids]), 8)[0]]  # greedy by default
    stops = [k for k in range(len(ids), len(out)) if out[k] in tok.stop_ids()]
    expected = tok.decode(out[:stops[0]] if stops else out)
    assert texts[1] == expected.strip() and texts[0] != texts[1]


def test_eval_with_adapter(base_dir, data_dir, adapted, capsys):
    from mindport.cli import main
    from mindport.train.data import PackedDataset
    from mindport.train.evaluate import evaluate

    model, adapter = adapted
    losses = []
    for extra in ([], ["--adapter", adapter]):
        capsys.readouterr()
        assert main(["eval", "--load", base_dir, "--data", data_dir, "--max-samples", "4"] + extra) == 0
        losses.append(next(float(line.split()[1]) for line in capsys.readouterr().out.splitlines()
                           if line.startswith("loss:")))
    expected = evaluate(model, PackedDataset(data_dir), 4, 4).loss
    assert losses[1] == pytest.approx(expected, abs=2e-6) and abs(losses[0] - losses[1]) > 1e-3


def test_converting_an_adapter_fails_in_one_line_pointing_to_lora_merge(adapted, tmp_path, capsys):
    from mindport.cli import main

    _, adapter = adapted
    assert main(["convert", "ms2hf", "--src", adapter, "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mindport lora merge" in err and adapter in err, err
    assert not (tmp_path / "out").exists()
