"""Weighted data mixtures (``train_dataset.data_dirs``): exact proportions over each epoch, every source
walked in its own permutations, exact resume, the config's one-line errors, and a short training run."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from mindport.config import ConfigError
from mindport.train.data import FORMAT, INDEX_FILE, TOKENS_FILE, DataError
from mindport.train.mixture import Mixture, MixtureLoader
from testkit.train import SEQ


def _packed(directory: str, source: int, samples: int, seq_length: int = 8) -> str:
    """A prepared directory (the data contract of mindport.train.data) whose sample i reads [source, i, ...]."""
    os.makedirs(directory)
    tokens = np.zeros((samples, seq_length), np.uint16)
    tokens[:, 0], tokens[:, 1] = source, np.arange(samples)
    tokens.tofile(os.path.join(directory, TOKENS_FILE))
    index = {"format": FORMAT, "seq_length": seq_length, "num_samples": samples, "dtype": "uint16",
             "vocab_size": 64, "eos_token_id": 2}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f)
    return directory


@pytest.fixture
def mixture(tmp_path):
    """Sources of 6, 10 and 4 samples weighted 1 : 2 : 2: an epoch of 20 takes 4, 8 and 8."""
    sizes, weights = (6, 10, 4), (1, 2, 2.0)
    return Mixture([{"path": _packed(str(tmp_path / f"s{k}"), k, n), "weight": w}
                    for k, (n, w) in enumerate(zip(sizes, weights))])


def _drawn(loader: MixtureLoader, batches: int) -> list[tuple[int, int]]:
    rows = [loader.next_batch().input_ids for _ in range(batches)]
    return [(int(r[0]), int(r[1])) for batch in rows for r in batch]


def test_an_epoch_hits_the_weights_exactly_and_each_source_walks_its_permutations(mixture):
    loader = MixtureLoader(mixture, batch_size=5, seed=3)
    drawn = _drawn(loader, 8)  # two epochs of 20
    assert loader.epoch == 2.0
    for epoch in (drawn[:20], drawn[20:]):
        assert [sum(1 for k, _ in epoch if k == s) for s in range(3)] == [4, 8, 8]
    for p in range(1, 21):  # spread evenly: every prefix within one sample of each share
        for s, share in enumerate((0.2, 0.4, 0.4)):
            assert abs(sum(1 for k, _ in drawn[:p] if k == s) - share * p) <= 1
    for s, n in enumerate((6, 10, 4)):  # each pass over a source is a permutation of it
        stream = [i for k, i in drawn if k == s]
        for start in range(0, len(stream) - n + 1, n):
            assert sorted(stream[start:start + n]) == list(range(n)), s
    assert [i for k, i in drawn if k == 0][:6] != list(range(6))  # shuffled


def test_resume_mid_epoch_continues_identically(mixture):
    straight = _drawn(MixtureLoader(mixture, batch_size=3, seed=1), 11)
    first = MixtureLoader(mixture, batch_size=3, seed=1)
    head = _drawn(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    resumed = MixtureLoader(mixture, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert head + _drawn(resumed, 7) == straight
    other = MixtureLoader(mixture, batch_size=3, seed=2)
    with pytest.raises(DataError, match="train_dataset.data_dirs: the checkpoint's data position"):
        other.load_state_dict(state)


def test_sources_must_share_seq_length(tmp_path):
    a, b = _packed(str(tmp_path / "a"), 0, 4), _packed(str(tmp_path / "b"), 1, 4, seq_length=16)
    with pytest.raises(DataError, match=r"^train_dataset.data_dirs\[1\] .*/b: seq_length differs from "):
        Mixture([{"path": a, "weight": 1}, {"path": b, "weight": 1}])


@pytest.mark.parametrize("data_dirs, message", [
    ([{"path": "a", "weight": 0}], r"key 'train_dataset.data_dirs\[0\].weight' = 0: expected a positive number"),
    ([{"path": "a", "weight": True}], r"key 'train_dataset.data_dirs\[0\].weight' = True"),
    ([{"path": "a"}], r"key 'train_dataset.data_dirs\[0\]' = \{'path': 'a'\}: expected a mapping with exactly"),
    ([], r"key 'train_dataset.data_dirs' = \[\]: expected a non-empty list"),
], ids=["zero-weight", "boolean-weight", "no-weight", "empty"])
def test_bad_mixtures_fail_in_one_line_naming_the_key(tmp_path, data_dirs, message):
    from mindport.train.config import run_config_from_dict

    doc = {"model": {"model_config": {"preset": "telechat2-tiny-gqa"}}, "train_dataset": {"data_dirs": data_dirs}}
    with pytest.raises(ConfigError, match=message) as err:
        run_config_from_dict(doc, "run.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("run.yaml: ")
    doc["train_dataset"] = {"data_dirs": [{"path": "a", "weight": 1}], "data_dir": "b"}
    with pytest.raises(ConfigError, match="no data_dir beside it"):
        run_config_from_dict(doc, "run.yaml")


def test_mindport_train_on_a_mixture_resumes_exactly(tmp_path, data_dir, tok_dir, corpus):
    from mindport.cli import main
    from mindport.tokenizer import Tokenizer
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.data import prepare
    from mindport.train.logger import read_metrics

    second = str(tmp_path / "second")
    prepare(corpus[6:], Tokenizer.load(tok_dir), second, SEQ)
    config = tmp_path / "run.yaml"
    with open("configs/telechat2/tiny_train.yaml") as f:
        doc = yaml.safe_load(f)
    doc["model"]["model_config"]["vocab_size"] = 512
    doc["train_dataset"] = {"data_dirs": [{"path": data_dir, "weight": 3}, {"path": second, "weight": 1}]}
    doc["runner_config"].update(seq_length=SEQ, batch_size=2, peak_tflops=1.0, save_steps=2)
    doc["lr_schedule"]["total_steps"] = 4
    config.write_text(yaml.safe_dump(doc))
    runs = {name: str(tmp_path / name) for name in ("straight", "split")}
    assert main(["train", "--config", str(config), "--no-progress", "--set", f"output_dir={runs['straight']}"]) == 0
    assert main(["train", "--config", str(config), "--no-progress", "--set", f"output_dir={runs['split']}",
                 "--stop-after", "2"]) == 0
    assert main(["train", "--config", str(config), "--no-progress", "--set", f"output_dir={runs['split']}",
                 "--resume"]) == 0
    a, b = read_metrics(runs["straight"]), read_metrics(runs["split"])
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    np.testing.assert_array_equal([m["loss"] for m in b], [m["loss"] for m in a])
    _, _, state = CheckpointManager(os.path.join(runs["split"], "checkpoints")).load(
        os.path.join(runs["split"], "checkpoints", "step_00000004"))
    assert state["data"]["consumed"] == 8 and [s["weight"] for s in state["data"]["sources"]] == [3.0, 1.0]
