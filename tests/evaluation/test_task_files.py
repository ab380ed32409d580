"""A malformed benchmark file fails `mindport eval --task` in one line naming the file, the line and the field,
before any model is loaded."""
import json
import os

import pytest

from testkit import benchmarks


def _break_csv(path: str, line: int, old: str, new: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _ceval_bad_answer(root):
    benchmarks.write_choice_benchmark("ceval", root, ("law",))
    path = f"{root}/val/law_val.csv"
    with open(path, encoding="utf-8") as f:
        rows = f.read().split("\n")
    rows[2] = rows[2][:-1] + "E"  # line 3: the second question's answer
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(rows))
    return path, ["line 3", "field 'answer' = 'E'", "expected one of A, B, C, D"]


def _cmmlu_bad_header(root):
    benchmarks.write_choice_benchmark("cmmlu", root, ("agronomy",))
    _break_csv(f"{root}/test/agronomy.csv", 1, "Answer", "Solution")
    return f"{root}/test/agronomy.csv", ["no column 'Answer'"]


def _mmlu_short_row(root):
    written = benchmarks.write_choice_benchmark("mmlu", root, ("anatomy",))
    row = written["anatomy"]["eval"][1]
    _break_csv(f"{root}/test/anatomy_test.csv", 2, f",{row[4]},{row[5]}", f",{row[5]}")
    return f"{root}/test/anatomy_test.csv", ["line 2", "5 fields: expected 6"]


def _mmlu_too_few_shots(root):
    benchmarks.write_choice_benchmark("mmlu", root, ("anatomy",), dev=2)
    return f"{root}/dev/anatomy_dev.csv", ["2 examples: expected at least --shots 5"]


def _hellaswag_bad_label(root):
    import numpy as np

    docs = benchmarks.hellaswag_docs(np.random.default_rng(0), 3)
    docs[1]["label"] = 7
    benchmarks.write_jsonl(f"{root}/hellaswag_val.jsonl", docs)
    return f"{root}/hellaswag_val.jsonl", ["line 2", "key 'label' = 7 with 4 endings"]


def _gsm8k_no_final_answer(root):
    import numpy as np

    docs = benchmarks.gsm8k_docs(np.random.default_rng(0), 3)
    docs[2]["answer"] = "forty two"
    benchmarks.write_jsonl(f"{root}/test.jsonl", docs)
    return f"{root}/test.jsonl", ["line 3", "key 'answer' = 'forty two'", "'#### <number>'"]


def _gsm8k_answer_not_a_number(root):
    import numpy as np

    docs = benchmarks.gsm8k_docs(np.random.default_rng(0), 3)
    docs[1]["answer"] = "She has some.\n#### abc"
    benchmarks.write_jsonl(f"{root}/test.jsonl", docs)
    return f"{root}/test.jsonl", ["line 2", "key 'answer' = 'She has some.\\n#### abc'", "'#### <number>'"]


def _gsm8k_not_json(root):
    os.makedirs(root)
    with open(f"{root}/test.jsonl", "w") as f:
        f.write(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    return f"{root}/test.jsonl", ["line 2", "not JSON"]


def _cmmlu_not_utf8(root):
    benchmarks.write_choice_benchmark("cmmlu", root, ("agronomy",))
    with open(f"{root}/test/agronomy.csv", "wb") as f:
        f.write(",Question,A,B,C,D,Answer\n0,".encode() + "问题".encode("gbk") + b",a,b,c,d,A\n")
    return f"{root}/test/agronomy.csv", ["not UTF-8 text"]


CASES = {"ceval": _ceval_bad_answer, "cmmlu": _cmmlu_bad_header, "cmmlu_gbk": _cmmlu_not_utf8, "mmlu": _mmlu_short_row,
         "mmlu_shots": _mmlu_too_few_shots, "hellaswag": _hellaswag_bad_label, "gsm8k": _gsm8k_no_final_answer,
         "gsm8k_nan": _gsm8k_answer_not_a_number, "gsm8k_json": _gsm8k_not_json}


@pytest.mark.parametrize("case", CASES)
def test_malformed_file_fails_in_one_line(case, tmp_path, capsys):
    from mindport.cli import main

    root = str(tmp_path / "data")
    path, fragments = CASES[case](root)
    shots = "5" if case == "mmlu_shots" else "0"
    args = ["eval", "--task", case.split("_")[0], "--data", root, "--load", str(tmp_path / "no_model"), "--shots", shots]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mindport: error: {path}: "), err
    assert all(fragment in err[0] for fragment in fragments), err[0]
