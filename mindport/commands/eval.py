"""``mindport eval``: mean loss and perplexity of a model on prepared data, or (``--task``) its accuracy on
one of the model cards' benchmarks read from the benchmark's released files."""
from __future__ import annotations

from mindport.evaluation import TASKS


def add_parser(sub) -> None:
    from mindport.commands.generate import add_quantize_argument

    p = sub.add_parser("eval", help="loss and perplexity on prepared data, or accuracy on a benchmark (--task)")
    p.add_argument("--load", required=True, help="model directory (checkpoint, mindport or HF format)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format or a LoRA training checkpoint)")
    add_quantize_argument(p)
    p.add_argument("--data", required=True,
                   help="directory written by `mindport data prepare`, or with --task the benchmark's files")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="score a benchmark from its released files in --data (see README: Evaluating against "
                        "the model cards)")
    p.add_argument("--shots", type=int, default=5, help="--task: few-shot examples from the dev/train split")
    p.add_argument("--limit", type=int, default=None, help="--task: only the first N questions of each subject")
    p.add_argument("--max-new-tokens", type=int, default=256, help="--task gsm8k: generated tokens per answer")
    p.add_argument("--tokenizer", default=None, help="--task: tokenizer directory or file (default: --load)")
    p.add_argument("--json", default=None, metavar="OUT", help="--task: write the results and settings to OUT")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (per data-parallel rank)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--model-parallel", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks (under msrun; --load: a model, or a checkpoint saved with this layout)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="data-parallel ranks (under msrun): each evaluates --batch-size rows of every batch")
    p.set_defaults(func=run)


def run(args) -> int:
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.models.quantize import quantize_weights

    from mindport.config import ParallelConfig
    from mindport.parallel.state import init_parallel

    for flag, value in (("--batch-size", args.batch_size), ("--model-parallel", args.model_parallel),
                        ("--data-parallel", args.data_parallel)):
        if value <= 0:
            raise ValueError(f"{flag} {value}: expected a positive integer")
    if args.task is not None:
        return run_task(args)
    from mindport.train.data import PackedDataset
    from mindport.train.evaluate import evaluate

    dataset = PackedDataset(args.data)
    groups = init_parallel(ParallelConfig(data_parallel=args.data_parallel, model_parallel=args.model_parallel))
    model = AutoModelForCausalLM.from_pretrained(args.load, adapter=args.adapter)
    if args.quantize:
        quantize_weights(model, args.quantize)
    result = evaluate(model, dataset, args.batch_size, args.max_samples)
    if groups.global_rank:
        return 0  # rank 0 reports
    print(f"samples: {result.samples}")
    print(f"tokens: {result.tokens}")
    print(f"loss: {result.loss:.6f}")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0


def run_task(args) -> int:
    import datetime
    import os
    import sys

    from mindport.config import ParallelConfig
    from mindport.evaluation.report import format_table, write_json
    from mindport.evaluation.tasks import read_task, score_task
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.models.quantize import quantize_weights
    from mindport.parallel.state import init_parallel
    from mindport.tokenizer import Tokenizer

    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"{args.data}: no such directory (--data: the {args.task} files)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"{args.json}: its directory does not exist (--json)")
    items = read_task(args.task, args.data, args.shots, args.limit)  # a malformed file fails before any loading
    tokenizer = Tokenizer.load(args.tokenizer or args.load)
    groups = init_parallel(ParallelConfig(data_parallel=args.data_parallel, model_parallel=args.model_parallel))
    model = AutoModelForCausalLM.from_pretrained(args.load, adapter=args.adapter)
    if args.quantize:
        quantize_weights(model, args.quantize)
    result = score_task(model, tokenizer, items, args.batch_size, args.max_new_tokens, progress=sys.stderr.isatty())
    if groups.global_rank:
        return 0  # rank 0 reports
    print(format_table(args.task, result))
    if args.json:
        settings = {"task": args.task, "data": os.path.abspath(args.data), "shots": args.shots, "limit": args.limit,
                    "model": os.path.abspath(args.load), "adapter": args.adapter and os.path.abspath(args.adapter),
                    "quantize": args.quantize,
                    "batch_size": args.batch_size, "model_parallel": args.model_parallel,
                    "data_parallel": args.data_parallel,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if args.task == "gsm8k":
            settings["max_new_tokens"] = args.max_new_tokens
        write_json(args.json, result, settings)
    return 0
