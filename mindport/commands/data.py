"""``mindport data prepare``: tokenize and pack documents into fixed-length training samples."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (tokenize + pack)")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("prepare", help="tokenize .txt/.jsonl files (BOS where the tokenizer adds it, EOS after each "
                        "document), pack into fixed-length samples",
                        description="Writes OUT/tokens.bin (memory-mapped token ids), OUT/index.json and a copy "
                                    "of the tokenizer in OUT/tokenizer/.")
    d.add_argument("--input", nargs="+", default=None, metavar="FILE",
                   help=".txt (one document per file) / .jsonl (one per line) files (default: the embedded corpus)")
    d.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.model or tokenizer.json")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--seq-length", type=int, default=256, help="tokens per sample (default 256)")
    d.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import Tokenizer, read_texts
    from mindport.train.data import prepare

    tok = Tokenizer.load(args.tokenizer)
    texts = read_texts(args.input, args.field) if args.input else pydoc_topics()
    source = ", ".join(args.input) if args.input else "the embedded corpus"
    index = prepare(texts, tok, args.out, args.seq_length, overwrite=args.overwrite, source=source)
    print(f"data: {args.out}: {index['num_documents']} documents, {index['num_tokens']:,} tokens -> "
          f"{index['num_samples']} samples of {index['seq_length']} ({index['dropped_tail_tokens']} tail tokens dropped)")
    return 0
