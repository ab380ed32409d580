"""``mindport lora``: LoRA adapters (merge into the base model, export a training checkpoint to PEFT)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from mindport.commands.convert import _size

    p = sub.add_parser("lora", help="LoRA adapters: merge into the base model, export to PEFT",
                       description="LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors).")
    lsub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    merge = lsub.add_parser("merge", help="base + adapter -> one model directory (as PEFT's merge_and_unload)",
                            description="Streaming: one tensor of the base at a time. The adapter is a PEFT "
                                        "directory or a LoRA training checkpoint (per-rank shards included).")
    merge.add_argument("--base", required=True, help="base model directory (HF or mindport format)")
    merge.add_argument("--adapter", required=True, help="adapter directory or LoRA training checkpoint")
    merge.add_argument("--dst", required=True, help="destination directory (written atomically)")
    merge.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    merge.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                       help="largest safetensors file, e.g. 5GB (the default) or 2GiB")
    merge.set_defaults(func=run_merge)
    export = lsub.add_parser("export", help="LoRA training checkpoint (per-rank shards too) -> PEFT adapter directory",
                             description="Joins a parallel run's per-rank adapter slices; the result loads with "
                                         "peft.PeftModel.from_pretrained and mindport's --adapter.")
    export.add_argument("--src", required=True, help="LoRA training checkpoint or adapter directory")
    export.add_argument("--dst", required=True, help="destination directory (written atomically)")
    export.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    export.set_defaults(func=run_export)


def run_merge(args) -> int:
    from mindport.ckpt_tools.lora_merge import merge_lora

    print(merge_lora(args.base, args.adapter, args.dst, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size))
    return 0


def run_export(args) -> int:
    from mindport.models.lora import export_adapter

    print(f"exported {export_adapter(args.src, args.dst, args.overwrite)} adapter tensors -> {args.dst}")
    return 0
