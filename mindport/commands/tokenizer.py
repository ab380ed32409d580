"""``mindport tokenizer``: train a sentencepiece BPE tokenizer; encode text with any tokenizer."""
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
