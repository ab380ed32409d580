"""``mindport data prepare``: tokenize documents or conversations into fixed-length training samples."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (tokenize + pack)")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("prepare", help="tokenize text documents (BOS where the tokenizer adds it, EOS after each) "
                        "or chat/alpaca records (chat template, loss on assistant turns) into fixed-length samples",
                        description="Writes OUT/tokens.bin (memory-mapped token ids), OUT/index.json and a copy "
                                    "of the tokenizer in OUT/tokenizer/; --format chat|alpaca also OUT/labels.bin "
                                    "(-100 outside assistant turns) and OUT/segments.bin (conversation per token).")
    d.add_argument("--input", nargs="+", default=None, metavar="FILE",
                   help="text: .txt (one document per file) / .jsonl (one per line) files (default: the embedded "
                        "corpus); chat/alpaca: .jsonl (one record per line) / .json (a list of records) files")
    d.add_argument("--format", default="text", choices=("text", "chat", "alpaca"),
                   help="text: documents; chat: {messages: [{role, content}]} or ShareGPT {conversations: "
                        "[{from, value}]}; alpaca: {instruction, input, output, system?, history?}")
    d.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.model or tokenizer.json")
    d.add_argument("--family", default=None, help="chat/alpaca: model family whose published chat template applies "
                   "when the tokenizer has none (telechat2, xverse, mixtral, qwen_moe)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--seq-length", type=int, default=256, help="tokens per sample (default 256)")
    d.add_argument("--field", default="text", help="text: JSON field holding the text in .jsonl inputs")
    d.add_argument("--pack", action="store_true", help="chat/alpaca: several conversations per sample (greedy, in "
                   "order, none split); default: one conversation per sample, padded")
    d.add_argument("--overflow", default="truncate", choices=("truncate", "drop"),
                   help="chat/alpaca: a conversation longer than --seq-length keeps its whole turns that fit "
                        "(truncate; dropped when the first exchange does not fit) or is dropped (default truncate)")
    d.add_argument("--train-on-prompt", action="store_true", help="chat/alpaca: take the loss on every token, "
                   "not only the assistant turns")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from mindport.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer, family=args.family)
    if args.format != "text":
        return _prepare_records(args, tok)
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import read_texts
    from mindport.train.data import prepare

    texts = read_texts(args.input, args.field) if args.input else pydoc_topics()
    source = ", ".join(args.input) if args.input else "the embedded corpus"
    index = prepare(texts, tok, args.out, args.seq_length, overwrite=args.overwrite, source=source)
    print(f"data: {args.out}: {index['num_documents']} documents, {index['num_tokens']:,} tokens -> "
          f"{index['num_samples']} samples of {index['seq_length']} ({index['dropped_tail_tokens']} tail tokens dropped)")
    return 0


def _prepare_records(args, tok) -> int:
    from mindport.train.sft_data import prepare_sft, read_records

    if not args.input:
        raise ValueError(f"--format {args.format}: needs --input (.jsonl/.json record files)")
    index = prepare_sft(read_records(args.input, args.format), tok, args.out, args.seq_length, pack=args.pack,
                        overflow=args.overflow, train_on_prompt=args.train_on_prompt, overwrite=args.overwrite,
                        source=", ".join(args.input), record_format=args.format)
    print(f"data: {args.out}: {index['num_records']} {args.format} records ({index['truncated_records']} truncated, "
          f"{index['dropped_records']} dropped, longer than {index['seq_length']} tokens), {index['num_tokens']:,} "
          f"tokens ({index['num_supervised_tokens']:,} trained on) -> {index['num_samples']} samples of "
          f"{index['seq_length']} ({'packed' if index['packed'] else 'one conversation each, padded'})")
    return 0
