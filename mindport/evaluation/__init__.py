"""The model cards' benchmarks from local files: readers of the released layouts, few-shot prompts,
scoring (log-likelihoods and greedy generation) and the accuracy report."""

TASKS = ("ceval", "cmmlu", "mmlu", "hellaswag", "gsm8k")  # `mindport eval --task` (mindport.evaluation.tasks)
