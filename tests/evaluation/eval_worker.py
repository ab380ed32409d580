"""Benchmark scoring under a parallel layout, launched by msrun (or alone: the single-process reference).

usage: eval_worker.py MODEL_DIR DATA_ROOT OUT_DIR ['{"model_parallel": 2, "data_parallel": 2}']

Scores DATA_ROOT/mmlu (log-likelihoods) and DATA_ROOT/gsm8k (greedy generation) with one shot and two
whole-sequence rolling log-likelihoods, and writes OUT_DIR/rank{r}.json on every rank.
"""
import json
import os
import sys

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.evaluation.scoring import rolling_loglikelihoods
from mindport.evaluation.tasks import read_task, score_task
from mindport.parallel.state import init_parallel
from mindport.tokenizer import Tokenizer

ROLLING = [[1] + list(range(3, 40)), [1] + [(7 * i) % 500 + 3 for i in range(300)]]  # the second spans 2 windows


def main(model_dir: str, data_root: str, out_dir: str, layout: str = "{}") -> None:
    groups = init_parallel(ParallelConfig(**json.loads(layout)))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    result = {}
    for task in ("mmlu", "gsm8k"):
        items = read_task(task, os.path.join(data_root, task), shots=1, limit=3)
        report = score_task(model, tokenizer, items, batch_size=2, max_new_tokens=8)
        result[task] = {"overall": report.overall, "samples": report.samples}
    result["rolling"] = rolling_loglikelihoods(model, ROLLING, batch_size=2)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{groups.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
