"""``mindport eval``: mean loss and perplexity of a model on prepared data."""
from __future__ import annotations


def add_parser(sub) -> None:
    from mindport.commands.generate import add_quantize_argument

    p = sub.add_parser("eval", help="mean loss and perplexity of a model on a prepared data directory")
    p.add_argument("--load", required=True, help="model directory (checkpoint, mindport or HF format)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format or a LoRA training checkpoint)")
    add_quantize_argument(p)
    p.add_argument("--data", required=True, help="directory written by `mindport data prepare`")
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
    from mindport.train.data import PackedDataset
    from mindport.train.evaluate import evaluate

    from mindport.config import ParallelConfig
    from mindport.parallel.state import init_parallel

    for flag, value in (("--batch-size", args.batch_size), ("--model-parallel", args.model_parallel),
                        ("--data-parallel", args.data_parallel)):
        if value <= 0:
            raise ValueError(f"{flag} {value}: expected a positive integer")
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
