"""Every family's tiny preset: slicing-rule coverage, parameter count, HF save/load round trip."""
import os
import sys

import numpy as np
import pytest

import mindport.research

from mindport import AutoConfig, AutoModelForCausalLM
from mindport.models.registry import families
from mindport.parallel.sharding import rule_for

TINY = [p for fam in families().values() for p in fam.presets if "tiny" in p]


def test_every_family_has_a_tiny_preset():
    assert {AutoConfig.from_preset(p).family for p in TINY} == {"telechat2", "xverse", "mixtral", "qwen_moe"}


@pytest.mark.parametrize("preset", TINY)
def test_each_parameter_matches_one_slicing_rule_and_count_is_exact(preset):
    model = AutoModelForCausalLM.from_preset(preset)
    total = 0
    for name, param in model.parameters_and_names():
        rule_for(name)  # raises unless exactly one rule matches
        total += int(np.prod(param.shape))
    assert total == model.config.num_parameters()


@pytest.mark.parametrize("preset", TINY)
def test_hf_round_trip_reproduces_logits(preset, tmp_path):
    model = AutoModelForCausalLM.from_preset(preset)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 9))
    model.save_pretrained(str(tmp_path / "hf"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert again.config == model.config
    assert np.array_equal(again(ids).asnumpy(), model(ids).asnumpy())


def test_every_research_folder_is_a_discovered_family():
    folders = {d for d in os.listdir(mindport.research.__path__[0])
               if not d.startswith("_") and os.path.isfile(os.path.join(mindport.research.__path__[0], d, "__init__.py"))}
    assert folders == {"telechat2", "xverse", "mixtral", "qwen_moe"}
    assert {f.name for f in families().values()} == {"telechat2", "xverse", "mixtral", "qwen_moe"}


def test_a_new_family_folder_is_discovered_without_editing_the_registry(tmp_path, monkeypatch):
    package = tmp_path / "more_families"
    (package / "toy").mkdir(parents=True)
    (package / "_shared.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "toy" / "__init__.py").write_text(
        "from mindport.models.registry import Family\n"
        "FAMILY = Family(name='toy', model_types=('toy',), arch={}, hf_fields={}, hf_export={},\n"
        "                presets={'toy-tiny': {}}, names=[])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = families("more_families")
    finally:
        for name in [m for m in sys.modules if m.startswith("more_families")]:
            del sys.modules[name]
    assert list(found) == ["toy"] and found["toy"].presets == {"toy-tiny": {}}



def test_each_family_carries_its_chat_template():
    fams = families()
    for name in ("telechat2", "xverse", "mixtral", "qwen_moe"):
        assert fams[name].chat_template.startswith("{#-") and "https://" in fams[name].chat_template, name
    assert fams["telechat2"].chat_tokens == ("<_user>", "<_bot>", "<_end>", "<_system>")
