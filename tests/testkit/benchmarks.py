"""Small synthetic benchmark files in the released layouts of C-Eval, CMMLU, MMLU, HellaSwag and GSM8K, and
a transformers reference scorer (torch log-softmax over the same prompt strings) for the evaluation tests."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

WINDOW = 256  # max_position_embeddings of the tiny evaluation model
WORDS = ("hello world quick brown fox jumps over the lazy dog on other hand for statement iterates "
         "你好 世界 快速的 棕色 狐狸 跳过了 懒狗").split()


def _phrase(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _rows(rng, count: int) -> list[list[str]]:
    """question, A, B, C, D, answer; one question holds a comma and a quote (CSV quoting)."""
    rows = [[_phrase(rng, 5), *(_phrase(rng, 2) for _ in range(4)), "ABCD"[rng.integers(4)]] for _ in range(count)]
    rows[0][0] += ', "quoted"'
    return rows


def _write_csv(path: str, header: list[str] | None, rows: list[list[str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_choice_benchmark(task: str, root: str, subjects: tuple[str, ...], dev: int = 2, test: int = 4,
                           seed: int = 0) -> dict[str, dict[str, list[list[str]]]]:
    """C-Eval / CMMLU / MMLU files for ``subjects``; returns {subject: {"dev": rows, "eval": rows}} with rows
    as question, A, B, C, D, answer."""
    rng = np.random.default_rng(seed)
    written = {}
    for subject in subjects:
        rows = {"dev": _rows(rng, dev), "eval": _rows(rng, test)}
        written[subject] = rows
        if task == "ceval":  # dev carries an explanation column; ids first
            _write_csv(f"{root}/dev/{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                       [[i, *r, "because"] for i, r in enumerate(rows["dev"])])
            _write_csv(f"{root}/val/{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
                       [[i, *r] for i, r in enumerate(rows["eval"])])
        elif task == "cmmlu":  # an unnamed index column first
            header = ["", "Question", "A", "B", "C", "D", "Answer"]
            _write_csv(f"{root}/dev/{subject}.csv", header, [[i, *r] for i, r in enumerate(rows["dev"])])
            _write_csv(f"{root}/test/{subject}.csv", header, [[i, *r] for i, r in enumerate(rows["eval"])])
        else:
            _write_csv(f"{root}/dev/{subject}_dev.csv", None, rows["dev"])
            _write_csv(f"{root}/test/{subject}_test.csv", None, rows["eval"])
    return written


def write_jsonl(path: str, docs: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def hellaswag_docs(rng, count: int) -> list[dict]:
    """Released-layout HellaSwag records (ind, activity_label, ctx_a, ctx_b, ctx, endings, label, ...)."""
    docs = []
    for i in range(count):
        ctx_a, ctx_b = _phrase(rng, 6) + " [title] " + _phrase(rng, 2), _phrase(rng, 3)
        docs.append({"ind": i, "activity_label": _phrase(rng, 1), "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain", "source_id": f"s{i}",
                     "endings": [_phrase(rng, int(rng.integers(1, 6))) for _ in range(4)],
                     "label": int(rng.integers(4))})
    return docs


def gsm8k_docs(rng, count: int) -> list[dict]:
    return [{"question": _phrase(rng, 8) + "?", "answer": f"{_phrase(rng, 4)}\n#### {int(rng.integers(900, 2000)):,}"}
            for _ in range(count)]


def torch_loglikelihood(llama, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``continuation`` after ``context`` (cut from the left to WINDOW, as
    lm-eval's hf backend does) and whether each of its tokens is the argmax; one unpadded forward."""
    import torch

    whole = (context + continuation)[-(WINDOW + 1):]
    with torch.no_grad():
        logits = llama(torch.tensor([whole[:-1]])).logits[0, -len(continuation):].double()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    return float(logp[torch.arange(len(continuation)), target].sum()), bool((logits.argmax(-1) == target).all())


def reference_loglikelihood(llama, hf_tokenizer, context: str, continuation: str) -> float:
    """The same for strings, tokenized by transformers without special tokens: the continuation's ids are those
    of context + continuation after as many ids as the context has (``context`` has no trailing space here)."""
    head = hf_tokenizer(context, add_special_tokens=False).input_ids
    whole = hf_tokenizer(context + continuation, add_special_tokens=False).input_ids
    return torch_loglikelihood(llama, head, whole[len(head):])[0]
