"""lm-evaluation-harness backend: ``mindport lm-eval`` on local tasks equals lm-eval's own ``hf`` backend.

One tiny transformers Mixtral (Llama-style tokenizer with BOS) and three local tasks (JSONL files read
through ``dataset_path: json``): multiple choice (loglikelihood), generate_until and
loglikelihood_rolling (one document longer than the model's 64-token window). lm-eval runs the ``hf``
backend in this process and ``mindport lm-eval`` (the wrapper, as a user runs it) in a subprocess; per
request the log-likelihoods agree within 1e-4, greedy flags, generated texts and metrics are equal.
Chat-template prompts are checked against transformers; bad settings against their one-line errors.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from testkit.hf_models import hf_moe
from testkit.tokenizers import metaspace_bos

CHOICE = [{"question": q, "choices": c, "label": label} for q, c, label in [  # text the tokenizer never saw
    ("Which animal is quick?", ["fox", "dog", "cat"], 0),
    ("Pick a colour:", ["brown", "lazy", "red"], 1),
    ("<s>Which hand?", ["other", "left", "right"], 0),  # starts with the BOS text: no BOS added
    ("最快的动物是 ", ["狐狸", "懒狗", "猫"], 2)]]  # trailing space: moved to the continuation
GENERATE = [{"prompt": p, "answer": a} for p, a in [("Hello world, the", "quick"), ("The quick brown", "fox"),
                                                    ("你好", "世界"), ("On the other hand the", "lazy")]]
ROLLING = [{"text": "Hello world, the quick brown fox jumps over the lazy dog."},
           {"text": " ".join(f"w{i} 狐{i}" for i in range(30))}]  # > 64 tokens: two windows
TASKS = {
    "mp_choice": ("choice.jsonl", CHOICE, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                  'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                  "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "mp_generate": ("generate.jsonl", GENERATE, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                    'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: [".", "ow"]\n  max_gen_toks: 8\n'
                    "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
    "mp_rolling": ("rolling.jsonl", ROLLING, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                   'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
                   "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
}
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_tasks(directory: str) -> str:
    """Each task of TASKS as a YAML beside its JSONL data file."""
    os.makedirs(directory, exist_ok=True)
    for name, (file, records, body) in TASKS.items():
        data = os.path.join(directory, file)
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{body}")
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(model dir, task dir, environment): a tiny Mixtral with a BOS-adding tokenizer, the local tasks,
    offline settings and a private datasets cache."""
    root = tmp_path_factory.mktemp("lm_eval")
    _, model_dir = hf_moe("mixtral", root / "model", vocab_size=512)
    metaspace_bos(model_dir)
    env = {**OFFLINE, "HF_DATASETS_CACHE": str(root / "datasets_cache")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield model_dir, write_tasks(str(root / "tasks")), env


def leaves(value) -> list:
    return [x for item in value for x in leaves(item)] if isinstance(value, (list, tuple)) else [value]


def hf_backend(model_dir: str, task_dir: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=list(TASKS),
                                   task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                   batch_size=4, device="cpu", log_samples=True)


def test_mindport_lm_eval_equals_hf_backend(workspace, tmp_path):
    model_dir, task_dir, env = workspace
    out = tmp_path / "out"
    command = [os.path.join(os.path.dirname(sys.executable), "mindport"), "lm-eval",
               "--model_args", f"pretrained={model_dir},batch_size=4", "--tasks", ",".join(TASKS),
               "--include_path", task_dir, "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    with open(results_file, encoding="utf-8") as f:
        ours = json.load(f)
    ours_samples = {}
    for task in TASKS:
        (samples_file,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(samples_file, encoding="utf-8") as f:
            ours_samples[task] = {s["doc_id"]: s for s in map(json.loads, f)}
    assert ours["config"]["model"] == "mindport"

    reference = hf_backend(model_dir, task_dir)
    for task in TASKS:
        ref_samples = {s["doc_id"]: s for s in reference["samples"][task]}
        assert sorted(ours_samples[task]) == sorted(ref_samples) == list(range(len(TASKS[task][1])))
        for doc_id, ref in ref_samples.items():
            mine, theirs = leaves(ours_samples[task][doc_id]["filtered_resps"]), leaves(ref["filtered_resps"])
            assert len(mine) == len(theirs) > 0, (task, doc_id)
            for got, want in zip(mine, theirs):  # the samples file holds every response as a string
                if isinstance(want, float):  # a log-likelihood
                    assert float(got) == pytest.approx(want, abs=1e-4), (task, doc_id, got, want)
                else:  # is_greedy, generated text
                    assert got == str(want), (task, doc_id, got, want)
        for metric, value in reference["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert any(s["filtered_resps"][0] for s in ours_samples["mp_generate"].values())  # some text was generated


@pytest.mark.parametrize("gen_kwargs, bad", [({"do_sample": True}, "do_sample"), ({"temperature": 0.7}, "temperature"),
                                             ({"num_beams": 4}, "num_beams=4")])
def test_sampling_is_refused_in_one_line(gen_kwargs, bad):
    from mindport.evaluation.lm_eval_model import MindportLM

    with pytest.raises(ValueError, match=bad) as err:
        MindportLM._greedy_settings({"until": ["\n"], **gen_kwargs}, "</s>")
    assert "\n" not in str(err.value)
    assert MindportLM._greedy_settings({"until": "\n\n", "max_gen_toks": 5, "do_sample": False, "top_p": 1.0},
                                       "</s>") == (["\n\n", "</s>"], 5)


def test_chat_template_prompt_equals_transformers(workspace, tmp_path):
    """--apply_chat_template: the prompt text equals transformers' (the hf backend's), the tokenizer given apart."""
    from transformers import AutoTokenizer

    from mindport.evaluation.lm_eval_model import MindportLM
    from mindport.tokenizer import Tokenizer
    from testkit.tokenizers import CHATML_GENERATION, with_chat_template

    tokenizer_dir = with_chat_template(metaspace_bos(str(tmp_path / "tok")), CHATML_GENERATION,
                                       ("<|im_start|>", "<|im_end|>"))
    lm = MindportLM.create_from_arg_string(f"pretrained={workspace[0]},tokenizer={tokenizer_dir}")
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which animal?"},
               {"role": "assistant", "content": "fox"}, {"role": "user", "content": "最快的动物是"}]
    expected = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        history, tokenize=False, add_generation_prompt=True, continue_final_message=False)
    assert lm.apply_chat_template(history) == expected
    assert lm.chat_template(True) == CHATML_GENERATION

    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + \
        CHATML_GENERATION  # as the hf backend, such a template renders the history without its system messages
    lm.tokenizer = Tokenizer.load(with_chat_template(metaspace_bos(str(tmp_path / "tok2")), no_system,
                                                     ("<|im_start|>", "<|im_end|>")))
    assert lm.apply_chat_template(history) == expected.replace("<|im_start|>system\nAnswer briefly.<|im_end|>\n", "")


@pytest.mark.parametrize("model_args, bad", [
    ({"pretrained": "/nonexistent", "beams": 3}, "lm-eval model_args: beams=3: not an argument"),
    ({"pretrained": "/nonexistent", "batch_size": "auto"}, "lm-eval model_args: batch_size='auto': expected"),
    ({}, "lm-eval model_args: no pretrained=DIR: expected")])
def test_bad_model_args_fail_in_one_line(model_args, bad):
    from mindport.evaluation.lm_eval_model import MindportLM

    with pytest.raises(ValueError, match=f"^{bad}") as err:  # before any model is read
        MindportLM.create_from_arg_obj(model_args, {"batch_size": 1, "device": "cuda:0"})
    assert "\n" not in str(err.value)


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    from mindport.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if not installed
    assert main(["lm-eval", "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "mindport[eval]"' in err


def test_help_says_it_is_mindport_lm_eval_then_prints_lm_evals_help(capsys):
    from mindport.cli import main
    from mindport.commands.lm_eval import HELP_HEADER

    with pytest.raises(SystemExit) as exited:  # lm-eval's argparse exits after its help
        main(["lm-eval", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and out.startswith(HELP_HEADER) and "--model mindport" in HELP_HEADER
    assert "--model_args" in out[len(HELP_HEADER):]  # lm-eval's own help, verbatim


@pytest.mark.parametrize("args, expected", [
    (["--tasks", "x"], ["run", "--model", "mindport", "--tasks", "x"]),
    (["run", "--model", "hf", "--tasks", "x"], ["run", "--model", "hf", "--tasks", "x"]),
    (["--model=hf"], ["run", "--model=hf"]),
    (["ls", "tasks"], ["ls", "tasks"]),
])
def test_lm_eval_argv(args, expected):
    from mindport.commands.lm_eval import lm_eval_argv

    assert lm_eval_argv(args) == expected
