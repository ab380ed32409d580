"""``mindport eval``: mean loss and perplexity of a model on prepared data."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="mean loss and perplexity of a model on a prepared data directory")
    p.add_argument("--load", required=True, help="model directory (checkpoint, mindport or HF format)")
    p.add_argument("--data", required=True, help="directory written by `mindport data prepare`")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples")
    p.set_defaults(func=run)


def run(args) -> int:
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.train.data import PackedDataset
    from mindport.train.evaluate import evaluate

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size {args.batch_size}: expected a positive integer")
    dataset = PackedDataset(args.data)
    model = AutoModelForCausalLM.from_pretrained(args.load)
    result = evaluate(model, dataset, args.batch_size, args.max_samples)
    print(f"samples: {result.samples}")
    print(f"tokens: {result.tokens}")
    print(f"loss: {result.loss:.6f}")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0
