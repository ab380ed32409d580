"""Greedy generation under a parallel layout (msrun), then again after weight-only int8 quantization of
each rank's shard; rank 0 writes both and the int8 model's logits of the first prompt (.npz).

usage: generate_worker.py MODEL_DIR OUT_FILE '{"model_parallel": 2}'
"""
import json
import sys

import numpy as np

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.models.quantize import quantize_weights
from mindport.parallel.state import init_parallel

PROMPTS = [[5, 6, 7, 8, 9], [11, 12]]


def main(model_dir: str, out_file: str, layout: dict) -> None:
    groups = init_parallel(ParallelConfig.from_dict(layout))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokens = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    quantize_weights(model)
    int8_tokens = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    int8_logits = model(np.asarray(PROMPTS[:1])).asnumpy()
    if groups.global_rank == 0:
        np.savez(out_file, tokens=tokens, int8_tokens=int8_tokens, int8_logits=int8_logits)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
