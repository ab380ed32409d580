"""``mindport convert``: streaming checkpoint conversion (HF <-> mindport, per-rank shards, merge)."""
from __future__ import annotations

import argparse


def _size(text: str) -> int:
    from mindport.ckpt_tools.convert import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(p, overwrite: bool = True, shard_size: bool = True) -> None:
    p.add_argument("--src", required=True, help="source directory")
    p.add_argument("--dst", required=True, help="destination directory (written atomically)")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    if shard_size:
        p.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                       help="largest safetensors file, e.g. 5GB (10^9 bytes, the default) or 2GiB")


def _parallel(p) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (per-rank export when any size > 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints: hf2ms, ms2hf, split, merge, resize-vocab",
                       description="Streaming checkpoint conversion, one tensor in memory at a time. Output is "
                                   "written to a temporary directory renamed into place at the end. Every "
                                   "non-weight file (tokenizer, generation_config.json, remote code) comes along, "
                                   "and ms2hf writes back the source's config.json.")
    csub = p.add_subparsers(dest="convert_command", required=True, metavar="ACTION")

    hf2ms = csub.add_parser("hf2ms", help="HF directory -> mindport directory (or per-rank shards with --tp/--pp/--ep)")
    _common(hf2ms)
    hf2ms.add_argument("--dtype", default="keep", choices=("keep", "fp32", "fp16", "bf16"),
                       help="tensor dtype of the output (default keep: bytes copied verbatim)")
    _parallel(hf2ms)
    hf2ms.set_defaults(func=run_hf2ms)

    ms2hf = csub.add_parser("ms2hf", help="mindport directory -> HF directory (HF names and layouts)")
    _common(ms2hf)
    ms2hf.add_argument("--dtype", default="keep", choices=("keep", "fp32", "fp16", "bf16"),
                       help="tensor dtype of the output (default keep)")
    ms2hf.set_defaults(func=run_ms2hf)

    split = csub.add_parser("split", help="mindport directory -> per-rank shards (reshard = merge + split)")
    _common(split)
    _parallel(split)
    split.set_defaults(func=run_split)

    merge = csub.add_parser("merge", help="per-rank shards (layout.json + rank_XXXX/) -> one mindport directory")
    _common(merge)
    merge.set_defaults(func=run_merge)

    resize = csub.add_parser("resize-vocab", help="HF directory -> the same model with an extended tokenizer's "
                                                  "vocabulary (new rows = mean of their pieces' rows)")
    _common(resize)
    resize.add_argument("--tokenizer", required=True,
                        help="the new tokenizer (mindport tokenizer extend of the model's own): its files go into --dst")
    resize.add_argument("--pad-to-multiple", type=int, default=1, metavar="N",
                        help="pad the vocabulary rows to a multiple of N (e.g. 64 x tensor parallel size); "
                             "recorded in config.json")
    resize.set_defaults(func=run_resize_vocab)


def _done(summary) -> int:
    print(summary)
    return 0


def run_hf2ms(args) -> int:
    from mindport.ckpt_tools.convert import hf_to_mindport

    return _done(hf_to_mindport(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, tp=args.tp,
                                pp=args.pp, ep=args.ep, max_shard_bytes=args.max_shard_size))


def run_ms2hf(args) -> int:
    from mindport.ckpt_tools.convert import mindport_to_hf

    return _done(mindport_to_hf(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                                dtype=args.dtype))


def run_split(args) -> int:
    from mindport.ckpt_tools.convert import split

    return _done(split(args.src, args.dst, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite,
                       max_shard_bytes=args.max_shard_size))


def run_merge(args) -> int:
    from mindport.ckpt_tools.convert import merge

    return _done(merge(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size))


def run_resize_vocab(args) -> int:
    from mindport.ckpt_tools.convert import resize_vocab

    return _done(resize_vocab(args.src, args.tokenizer, args.dst, pad_to_multiple=args.pad_to_multiple,
                              overwrite=args.overwrite, max_shard_bytes=args.max_shard_size))
