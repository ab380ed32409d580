"""`mindport eval --task X` on synthetic files in each benchmark's released layout, against a reference that
this test computes with transformers on the same weights: the prompt strings written here from each
benchmark's documented format, tokenized by transformers, scored by torch log-softmax (GSM8K: transformers'
greedy generate). Per-question log-likelihoods and per-subject accuracies must agree."""
import json
import re

import numpy as np
import pytest

from testkit import benchmarks

SHOTS, LIMIT = 1, 3
HEADERS = {
    "ceval": lambda s: f"以下是中国关于{ {'computer_network': '计算机网络'}.get(s, s.replace('_', ' '))}考试的单项选择题，"
                       f"请选出其中的正确答案。\n\n",
    "cmmlu": lambda s: f"以下是关于{ {'agronomy': '农学'}.get(s, s.replace('_', ' '))}的单项选择题，请直接给出正确答案的选项。\n\n",
    "mmlu": lambda s: f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
}
SUBJECTS = {"ceval": ("computer_network", "my_subject"), "cmmlu": ("agronomy", "my_subject"),
            "mmlu": ("abstract_algebra", "my_subject")}


def _eval(model_dir: str, task: str, data: str, out, *extra: str) -> dict:
    from mindport.cli import main

    assert main(["eval", "--task", task, "--load", model_dir, "--data", data, "--shots", str(SHOTS), "--limit",
                 str(LIMIT), "--batch-size", "3", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def _assert_matches(report: dict, expected: list[tuple[str, int, list[float], dict[str, float]]]) -> None:
    """``expected``: per question (subject, gold, reference log-likelihoods, reference metrics)."""
    got = [(s["subject"], s["gold"], s["loglikelihoods"]) for s in report["samples"]]
    assert [(s, g) for s, g, _ in got] == [(s, g) for s, g, *_ in expected]
    np.testing.assert_allclose([l for *_, ls in got for l in ls], [l for _, _, ls, _ in expected for l in ls],
                               rtol=1e-4, atol=1e-4)
    for subject in {s for s, *_ in expected}:
        rows = [metrics for s, _, _, metrics in expected if s == subject]
        for metric in rows[0]:
            assert report["subjects"][subject][metric] == pytest.approx(np.mean([r[metric] for r in rows]))


@pytest.mark.parametrize("task", ["ceval", "cmmlu", "mmlu"])
def test_multiple_choice_task_equals_transformers(task, tiny_eval_model, tmp_path):
    model_dir, llama, hf_tok = tiny_eval_model
    written = benchmarks.write_choice_benchmark(task, str(tmp_path / task), SUBJECTS[task])
    cue = "Answer:" if task == "mmlu" else "答案："

    def query(row):
        return f"{row[0].strip()}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\n{cue}"

    expected = []
    for subject in sorted(SUBJECTS[task]):
        prefix = HEADERS[task](subject) + "".join(f"{query(r)} {r[5]}\n\n" for r in written[subject]["dev"][:SHOTS])
        for row in written[subject]["eval"][:LIMIT]:
            lls = [benchmarks.reference_loglikelihood(llama, hf_tok, prefix + query(row), f" {x}") for x in "ABCD"]
            gold = "ABCD".index(row[5])
            expected.append((subject, gold, lls, {"acc": float(np.argmax(lls) == gold)}))
    report = _eval(model_dir, task, str(tmp_path / task), tmp_path / "out.json")
    _assert_matches(report, expected)
    assert report["settings"]["task"] == task and report["settings"]["shots"] == SHOTS
    assert report["overall"]["n"] == LIMIT * len(SUBJECTS[task])


def test_hellaswag_equals_transformers(tiny_eval_model, tmp_path):
    model_dir, llama, hf_tok = tiny_eval_model
    rng = np.random.default_rng(0)
    train, val = benchmarks.hellaswag_docs(rng, 2), benchmarks.hellaswag_docs(rng, 5)
    benchmarks.write_jsonl(str(tmp_path / "hs" / "hellaswag_train.jsonl"), train)
    benchmarks.write_jsonl(str(tmp_path / "hs" / "hellaswag_val.jsonl"), val)

    def clean(text):  # WikiHow artefacts, as lm-eval's hellaswag preprocess
        return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")

    def query(d):
        return clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'][:1].upper()}{d['ctx_b'][1:].lower()}")

    prefix = "".join(f"{query(d)} {clean(d['endings'][d['label']])}\n\n" for d in train[:SHOTS])
    expected = []
    for d in val[:LIMIT]:
        endings = [clean(e) for e in d["endings"]]
        lls = [benchmarks.reference_loglikelihood(llama, hf_tok, prefix + query(d), f" {e}") for e in endings]
        normed = np.array(lls) / [len(e) for e in endings]
        expected.append(("hellaswag", d["label"], lls, {"acc": float(np.argmax(lls) == d["label"]),
                                                        "acc_norm": float(np.argmax(normed) == d["label"])}))
    report = _eval(model_dir, "hellaswag", str(tmp_path / "hs"), tmp_path / "out.json")
    _assert_matches(report, expected)


def test_gsm8k_equals_transformers_greedy(tiny_eval_model, tmp_path):
    import torch

    model_dir, llama, hf_tok = tiny_eval_model
    rng = np.random.default_rng(1)
    train, test = benchmarks.gsm8k_docs(rng, 2), benchmarks.gsm8k_docs(rng, 4)
    benchmarks.write_jsonl(str(tmp_path / "gsm" / "train.jsonl"), train)
    benchmarks.write_jsonl(str(tmp_path / "gsm" / "test.jsonl"), test)
    prefix = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in train[:SHOTS])
    generations = []
    for d in test[:LIMIT]:
        ids = hf_tok(f"{prefix}Question: {d['question']}\nAnswer:", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = llama.generate(ids.input_ids, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2)
        text = hf_tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        generations.append(re.split(r"Question:|</s>|<\|im_end\|>", text)[0])
    report = _eval(model_dir, "gsm8k", str(tmp_path / "gsm"), tmp_path / "out.json", "--max-new-tokens", "16")
    assert [s["generation"] for s in report["samples"]] == generations
    assert [s["gold"] for s in report["samples"]] == [d["answer"].split("#### ")[1].replace(",", "")
                                                      for d in test[:LIMIT]]
    assert report["overall"]["exact_match"] == 0.0  # a random tiny model writes no '#### N'


def test_gsm8k_strict_match_extraction():
    from mindport.evaluation.tasks import gsm8k_extract, gsm8k_number

    assert gsm8k_extract("so 3 + 4 = 7.\n#### 1,234.\n\nQuestion") == "1234"
    assert gsm8k_extract("#### $-5") is None  # strict: the number follows '#### ' directly
    assert gsm8k_extract("#### -5\n#### 6") == "-5"
    assert gsm8k_extract("The answer is 7") is None
    assert gsm8k_number("1,000") == gsm8k_number("1000.") == "1000"


@pytest.mark.slow
def test_tensor_and_data_parallel_scores_equal_one_process(tiny_eval_model, tmp_path):
    """One msrun launch of 4 ranks, TP2 x DP2: every rank returns the single-process log-likelihoods, accuracy,
    generations and rolling log-likelihoods (requests and prompts split unevenly over the dp ranks)."""
    import os
    import subprocess
    import sys

    from testkit import launch

    worker = os.path.join(os.path.dirname(__file__), "eval_worker.py")
    benchmarks.write_choice_benchmark("mmlu", str(tmp_path / "data" / "mmlu"), ("anatomy", "virology"))
    rng = np.random.default_rng(2)
    benchmarks.write_jsonl(str(tmp_path / "data" / "gsm8k" / "train.jsonl"), benchmarks.gsm8k_docs(rng, 1))
    benchmarks.write_jsonl(str(tmp_path / "data" / "gsm8k" / "test.jsonl"), benchmarks.gsm8k_docs(rng, 3))
    model_dir, data = tiny_eval_model[0], str(tmp_path / "data")
    subprocess.run([sys.executable, worker, model_dir, data, str(tmp_path / "single")], check=True, capture_output=True)
    with open(tmp_path / "single" / "rank0.json") as f:
        expected = json.load(f)
    launch.msrun(worker, [model_dir, data, str(tmp_path / "tp2dp2"), json.dumps({"model_parallel": 2,
                                                                                 "data_parallel": 2})],
                 4, str(tmp_path / "log"))
    ranks = []
    for rank in range(4):
        with open(tmp_path / "tp2dp2" / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    assert all(r == ranks[0] for r in ranks[1:])  # every rank holds the same, gathered results
    got = ranks[0]
    assert got["mmlu"]["overall"] == expected["mmlu"]["overall"]
    np.testing.assert_allclose([l for s in got["mmlu"]["samples"] for l in s["loglikelihoods"]],
                               [l for s in expected["mmlu"]["samples"] for l in s["loglikelihoods"]], rtol=1e-5)
    assert got["gsm8k"] == expected["gsm8k"]
    np.testing.assert_allclose(got["rolling"], expected["rolling"], rtol=1e-5)
