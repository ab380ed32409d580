"""``mindport tokenizer``: train a sentencepiece BPE tokenizer, extend a vocabulary, compare tokenizers' efficiency,
encode text with any tokenizer."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train (sentencepiece BPE) or try out a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-fallback BPE sentencepiece model")
    t.add_argument("--input", nargs="+", default=None, metavar="FILE",
                   help=".txt / .jsonl files (default: the embedded corpus, CPython's pydoc topics)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output directory (tokenizer.model + tokenizer_config.json)")
    t.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs")
    t.set_defaults(func=run_train)
    e = tsub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    e.add_argument("--text", required=True)
    e.set_defaults(func=run_encode)
    x = tsub.add_parser("extend", help="merge new pieces into a tokenizer, every old piece keeping its id",
                        description="Append new pieces to a sentencepiece tokenizer.model or a BPE tokenizer.json "
                                    "(Chinese-LLaMA's merge): old ids unchanged, pieces already present skipped, "
                                    "tokenizer_config.json and special tokens carried.")
    x.add_argument("--tokenizer", required=True, help="the base tokenizer (directory or file)")
    new = x.add_mutually_exclusive_group(required=True)
    new.add_argument("--from", dest="source", metavar="TOKENIZER", help="take the new pieces from this tokenizer")
    new.add_argument("--train-on", nargs="+", metavar="FILE", help="train the new pieces on .txt / .jsonl files")
    x.add_argument("--new-pieces", type=int, default=0, metavar="N",
                   help="with --train-on: size of the trained vocabulary (its pieces the base lacks are added)")
    x.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs")
    x.add_argument("--out", required=True, help="output tokenizer directory")
    x.set_defaults(func=run_extend)
    s = tsub.add_parser("stats", help="tokens per character of tokenizers over a text (efficiency table)")
    s.add_argument("--tokenizer", action="append", required=True, help="a tokenizer; repeat to compare several")
    s.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt / .jsonl files")
    s.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs")
    s.set_defaults(func=run_stats)


def run_train(args) -> int:
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import read_texts, train_sentencepiece

    texts = read_texts(args.input, args.field) if args.input else pydoc_topics()
    tok = train_sentencepiece(texts, args.vocab_size, args.out)
    print(f"tokenizer: {tok.source} (sentencepiece BPE, {tok.vocab_size} tokens, bos {tok.bos_id}, "
          f"eos {tok.eos_id}, pad {tok.pad_id})")
    return 0


def run_encode(args) -> int:
    from mindport.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(" ".join(map(str, ids)))
    return 0


def run_extend(args) -> int:
    from mindport.tokenizer import read_texts
    from mindport.vocab import extend

    texts = read_texts(args.train_on, args.field) if args.train_on else None
    print(extend(args.tokenizer, args.out, source=args.source, train_texts=texts, new_pieces=args.new_pieces))
    return 0


def run_stats(args) -> int:
    from mindport.tokenizer import Tokenizer, read_texts
    from mindport.vocab import stats

    texts = list(read_texts(args.input, args.field))
    rows = stats([Tokenizer.load(path) for path in args.tokenizer], texts)
    width = max(len("tokenizer"), *(len(r["tokenizer"]) for r in rows))
    print(f"{'tokenizer':<{width}}  {'vocab':>8}  {'tokens':>10}  {'tokens/char':>11}  {'chars/token':>11}")
    for r in rows:
        print(f"{r['tokenizer']:<{width}}  {r['vocab_size']:>8}  {r['tokens']:>10}  {r['tokens_per_char']:>11.4f}  "
              f"{r['chars_per_token']:>11.4f}")
    print(f"({rows[0]['chars']} characters in {len(texts)} documents, special tokens not counted)")
    return 0
