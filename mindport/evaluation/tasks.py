"""The model cards' benchmarks read from their released files, prompted and scored as lm-eval does.

Layouts under ``--data DIR`` (as each benchmark's own repository releases them):

=========  ===========================================================  ==================================
task       evaluated                                                    few-shot examples (first ``shots``)
=========  ===========================================================  ==================================
ceval      ``val/<subject>_val.csv``: id,question,A,B,C,D,answer        ``dev/<subject>_dev.csv``
cmmlu      ``test/<subject>.csv``: (index),Question,A,B,C,D,Answer      ``dev/<subject>.csv``
mmlu       ``test/<subject>_test.csv``: question,A,B,C,D,answer, no     ``dev/<subject>_dev.csv``
           header
hellaswag  ``hellaswag_val.jsonl``: activity_label, ctx_a, ctx_b,       ``hellaswag_train.jsonl``
           endings, label
gsm8k      ``test.jsonl``: question, answer ending ``#### N``           ``train.jsonl``
=========  ===========================================================  ==================================

(C-Eval's test split has no answers, so its val split is scored, as lm-eval's ``ceval-valid`` does.)

Prompts (lm-eval's formats; few-shot examples carry their answer and are joined by a blank line):

- C-Eval: ``以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。`` + blank line, then per question
  ``{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：`` (科目: the subject's Chinese name, subjects.py;
  the header is C-Eval's own wording, lm-eval's ``ceval-valid`` leaves out 考试).
- CMMLU: ``以下是关于{科目}的单项选择题，请直接给出正确答案的选项。`` + blank line, questions as C-Eval's.
- MMLU: ``The following are multiple choice questions (with answers) about {subject}.`` + blank line, then
  ``{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:``.
- The multiple-choice continuations are `` A`` .. `` D``; the prediction is the option with the highest
  summed log-likelihood (acc).
- HellaSwag: the query is ``{activity_label}: {ctx_a} {Ctx_b}`` and the options `` {ending}``, both cleaned
  as lm-eval does (WikiHow ``[title]`` and bracket artefacts removed); acc, and acc_norm: the highest
  log-likelihood divided by the ending's length in characters (lm-eval's rule; bytes for ASCII text).
- GSM8K: ``Question: {question}\\nAnswer:``, examples followed by `` {answer}``; greedy generation until
  ``Question:``, ``</s>`` or ``<|im_end|>`` (and EOS). Scored by lm-eval's "strict-match": the first
  ``#### N`` of the generation against the reference's, both with commas, ``$`` and a final ``.`` removed.

Contexts are tokenized without special tokens and a context's trailing spaces move to the continuation
(lm-eval's hf backend). Overall accuracy is over all questions (lm-eval's group mean weighted by size);
the mean over subjects (C-Eval's and CMMLU's own headline) is reported beside it.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from mindport.evaluation import TASKS, scoring
from mindport.evaluation.subjects import CEVAL, CMMLU, subject_name
from mindport.train.data import DataError

LETTERS = ("A", "B", "C", "D")
GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


@dataclass
class MultipleChoice:
    subject: str
    context: str  # the prompt up to the answer cue
    choices: list[str]  # continuations, each with its leading space
    gold: int


@dataclass
class Generation:
    subject: str
    prompt: str
    gold: str  # the reference number, normalised


@dataclass
class TaskResult:
    """Per subject: question count and metric means; ``overall`` over all questions; ``samples``: per question
    its subject, gold answer and what was scored (the options' log-likelihoods, or the generation)."""
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    subject_mean: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- files
def _text_lines(path: str):
    """The open file ``path`` (UTF-8, a BOM dropped); a missing file or other encoding fails in one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: byte {err.start}: not UTF-8 text (expected the released UTF-8 files)") from None
    return open(path, encoding="utf-8-sig", newline="")


def _read_csv(path: str, fields: tuple[str, ...], header: bool) -> list[dict]:
    """Rows of ``path`` as {field: value, "_line": n}: by the header's column names, or (no header) by position."""
    with _text_lines(path) as f:
        reader = csv.reader(f)
        if header:
            names = next(reader, [])
            missing = [name for name in fields if name not in names]
            if missing:
                raise DataError(f"{path}: header {','.join(names)}: no column '{missing[0]}' (expected the columns "
                                f"{','.join(fields)})")
            columns = [names.index(name) for name in fields]
        else:
            columns = list(range(len(fields)))
        rows = []
        for values in reader:
            if not values:
                continue
            if len(values) < max(columns) + 1:
                raise DataError(f"{path}: line {reader.line_num}: {len(values)} fields: expected "
                                f"{max(columns) + 1} ({','.join(fields)})")
            rows.append({name: values[c] for name, c in zip(fields, columns)} | {"_line": reader.line_num})
    if not rows:
        raise DataError(f"{path}: no rows: expected one question per row")
    return rows


def _read_jsonl(path: str, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Objects of a JSON-lines file, each checked to have ``fields`` of their types."""
    docs = []
    with _text_lines(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}: line {n}: not JSON: expected one JSON object per line") from None
            if not isinstance(doc, dict):
                raise DataError(f"{path}: line {n}: a {type(doc).__name__}: expected a JSON object")
            for key, kinds in fields.items():
                if not isinstance(doc.get(key), kinds):
                    names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                    raise DataError(f"{path}: line {n}: key '{key}' = {doc.get(key)!r}: expected a {names}")
            docs.append(doc | {"_line": n})
    if not docs:
        raise DataError(f"{path}: no lines: expected one JSON object per line")
    return docs


def _answer_index(path: str, row: dict, key: str) -> int:
    if row[key].strip() not in LETTERS:
        raise DataError(f"{path}: line {row['_line']}: field '{key}' = {row[key]!r}: expected one of "
                        f"{', '.join(LETTERS)}")
    return LETTERS.index(row[key].strip())


def _few_shot(rows: list, shots: int, path: str) -> list:
    if len(rows) < shots:
        raise DataError(f"{path}: {len(rows)} examples: expected at least --shots {shots}")
    return rows[:shots]


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class ChoiceLayout:
    """A per-subject CSV benchmark: where its splits live and how a question is worded."""
    eval_split: str
    file_suffix: Callable[[str], str]  # split -> file name suffix after the subject
    fields: tuple[str, ...]  # question, A, B, C, D, answer column names
    header: bool
    describe: Callable[[str], str]  # subject -> the header line
    answer_cue: str


CHOICE_LAYOUTS = {
    "ceval": ChoiceLayout("val", lambda split: f"_{split}", ("question", "A", "B", "C", "D", "answer"), True,
                          lambda s: f"以下是中国关于{subject_name(CEVAL, s)}考试的单项选择题，请选出其中的正确答案。",
                          "答案："),
    "cmmlu": ChoiceLayout("test", lambda split: "", ("Question", "A", "B", "C", "D", "Answer"), True,
                          lambda s: f"以下是关于{subject_name(CMMLU, s)}的单项选择题，请直接给出正确答案的选项。",
                          "答案："),
    "mmlu": ChoiceLayout("test", lambda split: f"_{split}", ("question", "A", "B", "C", "D", "answer"), False,
                         lambda s: f"The following are multiple choice questions (with answers) about "
                                   f"{s.replace('_', ' ')}.", "Answer:"),
}


def _subjects(data_dir: str, layout: ChoiceLayout) -> list[str]:
    split_dir = os.path.join(data_dir, layout.eval_split)
    suffix = layout.file_suffix(layout.eval_split) + ".csv"
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"{split_dir}: no such directory (expected <subject>{suffix} files)")
    subjects = sorted(name[:-len(suffix)] for name in os.listdir(split_dir) if name.endswith(suffix))
    if not subjects:
        raise DataError(f"{split_dir}: no <subject>{suffix} files")
    return subjects


def choice_questions(task: str, data_dir: str, shots: int, limit: int | None) -> list[MultipleChoice]:
    """C-Eval, CMMLU or MMLU questions with their few-shot prompts, subject by subject."""
    layout = CHOICE_LAYOUTS[task]
    question_key, *options, answer_key = layout.fields

    def path_of(split: str, subject: str) -> str:
        return os.path.join(data_dir, split, f"{subject}{layout.file_suffix(split)}.csv")

    def query(row: dict) -> str:
        lines = [row[question_key].strip()] + [f"{letter}. {row[key]}" for letter, key in zip(LETTERS, options)]
        return "\n".join(lines) + "\n" + layout.answer_cue

    questions = []
    for subject in _subjects(data_dir, layout):
        prefix = layout.describe(subject) + "\n\n"
        if shots:
            dev_path = path_of("dev", subject)
            for row in _few_shot(_read_csv(dev_path, layout.fields, layout.header), shots, dev_path):
                prefix += f"{query(row)} {LETTERS[_answer_index(dev_path, row, answer_key)]}\n\n"
        path = path_of(layout.eval_split, subject)
        for row in _read_csv(path, layout.fields, layout.header)[:limit]:
            gold = _answer_index(path, row, answer_key)
            questions.append(MultipleChoice(subject, prefix + query(row), [f" {x}" for x in LETTERS], gold))
    return questions


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_questions(data_dir: str, shots: int, limit: int | None) -> list[MultipleChoice]:
    fields = {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": (int, str)}

    def parse(path: str, doc: dict) -> tuple[str, list[str], int]:
        endings = doc["endings"]
        label = str(doc["label"])
        if not all(isinstance(e, str) for e in endings) or not label.isdigit() or int(label) >= len(endings):
            raise DataError(f"{path}: line {doc['_line']}: key 'label' = {doc['label']!r} with {len(endings)} "
                            f"endings: expected an index into the list of string endings")
        query = _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
        return query, [_hellaswag_clean(e) for e in endings], int(label)

    prefix = ""
    if shots:
        train = os.path.join(data_dir, "hellaswag_train.jsonl")
        for doc in _few_shot(_read_jsonl(train, fields), shots, train):
            query, endings, gold = parse(train, doc)
            prefix += f"{query} {endings[gold]}\n\n"
    path = os.path.join(data_dir, "hellaswag_val.jsonl")
    questions = []
    for doc in _read_jsonl(path, fields)[:limit]:
        query, endings, gold = parse(path, doc)
        questions.append(MultipleChoice("hellaswag", prefix + query, [f" {e}" for e in endings], gold))
    return questions


def gsm8k_number(text: str) -> str:
    """lm-eval's exact-match normal form: commas, ``$`` and a final ``.`` removed, lower case."""
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "")).strip().lower()


def gsm8k_extract(generation: str) -> str | None:
    """The strict-match answer: the number after the first ``#### `` (None if there is none)."""
    found = GSM8K_ANSWER.search(generation)
    return gsm8k_number(found.group(1)) if found else None


def gsm8k_problems(data_dir: str, shots: int, limit: int | None) -> list[Generation]:
    fields = {"question": str, "answer": str}

    def gold(path: str, doc: dict) -> str:
        number = gsm8k_number(doc["answer"].split("#### ")[-1]) if "#### " in doc["answer"] else ""
        if not re.fullmatch(r"-?[0-9.]*[0-9]", number):
            raise DataError(f"{path}: line {doc['_line']}: key 'answer' = {doc['answer'][-40:]!r}: expected a "
                            f"solution ending '#### <number>'")
        return number

    prefix = ""
    if shots:
        train = os.path.join(data_dir, "train.jsonl")
        for doc in _few_shot(_read_jsonl(train, fields), shots, train):
            gold(train, doc)
            prefix += f"Question: {doc['question']}\nAnswer: {doc['answer']}\n\n"
    path = os.path.join(data_dir, "test.jsonl")
    return [Generation("gsm8k", f"{prefix}Question: {doc['question']}\nAnswer:", gold(path, doc))
            for doc in _read_jsonl(path, fields)[:limit]]



# ---------------------------------------------------------------------------------------------- scoring
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's hf rule: trailing spaces of the context move to the continuation; the continuation's ids are
    those of context + continuation after the context's ids. Without special tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode_batch([context + continuation, context], False)
    return head, whole[len(head):]


def _summarise(scores: list[tuple[str, dict[str, float]]], samples: list[dict]) -> TaskResult:
    """Means per subject, over all questions, and over subjects, from (subject, {metric: 0/1})."""
    result = TaskResult(samples=samples)
    by_subject: dict[str, list[dict[str, float]]] = {}
    for subject, metrics in scores:
        by_subject.setdefault(subject, []).append(metrics)
    metrics = list(scores[0][1])
    for subject, rows in by_subject.items():
        result.subjects[subject] = {"n": len(rows)} | {m: sum(r[m] for r in rows) / len(rows) for m in metrics}
    result.overall = {"n": len(scores)} | {m: sum(s[m] for _, s in scores) / len(scores) for m in metrics}
    result.subject_mean = {m: sum(s[m] for s in result.subjects.values()) / len(result.subjects) for m in metrics}
    return result


def read_task(task: str, data_dir: str, shots: int = 5, limit: int | None = None) -> list:
    """The questions of benchmark ``task`` in ``data_dir`` with their prompts (see the module docstring):
    ``MultipleChoice`` items, or ``Generation`` items for gsm8k."""
    if task not in TASKS:
        raise ValueError(f"task '{task}': expected one of {', '.join(TASKS)}")
    if shots < 0:
        raise ValueError(f"shots = {shots}: expected a non-negative number of few-shot examples")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit = {limit}: expected a positive number of questions per subject")
    if task == "gsm8k":
        return gsm8k_problems(data_dir, shots, limit)
    if task == "hellaswag":
        return hellaswag_questions(data_dir, shots, limit)
    return choice_questions(task, data_dir, shots, limit)


def score_task(model, tokenizer, items: list, batch_size: int = 8, max_new_tokens: int = 256,
               progress: bool = False) -> TaskResult:
    """Accuracy of ``model`` on ``items`` from :func:`read_task`: multiple choice by log-likelihood (acc,
    acc_norm), generation by strict-match exact match."""
    if items and isinstance(items[0], Generation):
        outputs = scoring.generate_until(model, tokenizer, [p.prompt for p in items], [list(GSM8K_STOPS)] * len(items),
                                         max_new_tokens, batch_size, progress)
        answers = [gsm8k_extract(out) for out in outputs]
        return _summarise([(p.subject, {"exact_match": float(answer == p.gold)}) for p, answer in zip(items, answers)],
                          [{"subject": p.subject, "gold": p.gold, "generation": out, "answer": answer}
                           for p, out, answer in zip(items, outputs, answers)])
    requests = [encode_pair(tokenizer, q.context, choice) for q in items for choice in q.choices]
    results = iter(scoring.loglikelihoods(model, requests, batch_size, progress))
    normalise = len({len(choice) for q in items for choice in q.choices}) > 1  # else acc_norm = acc
    scores, samples = [], []
    for q in items:
        lls = [next(results)[0] for _ in q.choices]
        samples.append({"subject": q.subject, "gold": q.gold, "loglikelihoods": lls})
        metrics = {"acc": float(_argmax(lls) == q.gold)}
        if normalise:  # by the option's length in characters, without its leading space
            metrics["acc_norm"] = float(_argmax([ll / len(c[1:]) for ll, c in zip(lls, q.choices)]) == q.gold)
        scores.append((q.subject, metrics))
    return _summarise(scores, samples)


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's tie rule, as lm-eval)."""
    return max(range(len(values)), key=values.__getitem__)
