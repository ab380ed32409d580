"""Greedy generation under a parallel layout (msrun); rank 0 writes the tokens.

usage: generate_worker.py MODEL_DIR OUT_FILE '{"model_parallel": 2}'
"""
import json
import sys

import numpy as np

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.parallel.state import init_parallel

PROMPTS = [[5, 6, 7, 8, 9], [11, 12]]


def main(model_dir: str, out_file: str, layout: dict) -> None:
    groups = init_parallel(ParallelConfig.from_dict(layout))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokens = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    if groups.global_rank == 0:
        np.save(out_file, tokens)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
