"""``mindport plan``: the layouts of a model on N Atlas 800T A2 NPUs, ranked by predicted tokens/s per NPU."""
from __future__ import annotations

import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="rank the parallel layouts of a model on N NPUs by predicted throughput and memory")
    p.add_argument("--model", help="preset name, HF/mindport model directory, or config.json")
    p.add_argument("--npus", type=int, help="number of NPUs (8 per Atlas 800T A2 node)")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (infer: context length)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: about 4M tokens, at least one per NPU)")
    p.add_argument("--mode", choices=["train", "lora", "infer"], default=None,
                   help="train: full fine-tune/pretrain; lora: frozen base, trainable adapters (the --config's "
                        "pet_config, else rank 16 on every attention, dense MLP and shared-expert projection); infer: decoding "
                        "(default: lora for a --config with a pet_config, infer for one with run_mode: predict, "
                        "else train)")
    p.add_argument("--layout", default=None, metavar="dp=..,tp=..,pp=..,ep=..,cp=..",
                   help="only layouts with these degrees (the rest: micro-batches, recompute, ZeRO, still searched)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="a run config: its model, LoRA pet_config, layout, sequence length and global batch "
                        "(with --npus: its layout is searched again)")
    p.add_argument("--header", action="store_true",
                   help="with --config: print the '# Predicted:' header line for the file's own layout (nothing searched)")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--write", default=None, metavar="OUT.yaml", help="write the best fitting layout as a run config")
    p.add_argument("--calibrate", action="store_true",
                   help="predicted vs published for the calibration runs (../shared/ASCEND.md)")
    p.set_defaults(func=run)


def _from_config(args):
    """The RunConfig of a run YAML (its checkpoint need not exist:
    the architecture then comes from the preset)."""
    import yaml

    from mindport.train.config import load_yaml

    if not os.path.isfile(args.config):
        raise ValueError(f"--config {args.config}: no such config file")
    with open(args.config, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    overrides = [] if os.path.exists(str(doc.get("load_checkpoint"))) else ["load_checkpoint=null"]
    return load_yaml(args.config, overrides)


def _check_positive(**values) -> None:
    for flag, value in values.items():
        if value is None:
            raise ValueError(f"--{flag.replace('_', '-')} missing: expected a positive integer (or --config YAML)")
        if value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")


def run(args) -> int:
    from mindport.plan import planner

    if args.calibrate:
        rows = planner.calibrate()
        print(json.dumps(rows, indent=1) if args.json else planner.format_calibration(rows))
        return 0
    degrees = planner.parse_layout(args.layout) if args.layout else {}
    lora = mode = None
    if args.header and not args.config:
        raise ValueError("--header needs --config YAML (the run config whose header line to print)")
    if args.config:
        run_config = _from_config(args)
        if args.header:
            print(planner.config_prediction(run_config))
            return 0
        layout = planner.config_layout(run_config)
        from_yaml = dict(dp=layout.dp, tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep)
        batch = layout.dp * layout.micro_batch * layout.micro_batches
        config, lora = run_config.model, run_config.lora
        mode = "infer" if run_config.run_mode == "predict" else "lora" if lora else "train"
        if not args.npus:  # the YAML's own layout; with --npus the layout is searched again
            degrees = {**from_yaml, **degrees}
        seq = args.seq_length or run_config.train.seq_length
        batch, npus = args.global_batch or batch, args.npus or run_config.parallel.world_size
    else:
        if not args.model:
            raise ValueError("--model missing: expected a preset name, a model directory or a config.json "
                             "(or --config YAML)")
        config = planner.load_model(args.model)
        seq, batch, npus = args.seq_length, args.global_batch, args.npus
    _check_positive(npus=npus, seq_length=seq)
    mode = args.mode or mode or "train"
    if args.write and mode == "infer":
        raise ValueError(f"--write {args.write} with --mode infer: run YAMLs are written for training (--mode train "
                         f"or lora); serving is configured on `mindport generate`'s command line")
    lora = (lora or planner.default_lora(config)) if mode == "lora" else None
    if mode == "infer":
        rows = planner.plan_inference(config, npus, seq, tps=(degrees["tp"],) if "tp" in degrees else None,
                                      batch=run_config.train.batch_size if args.config else None)
        if not rows:
            raise ValueError(f"--npus {npus}: no tensor-parallel degree (1, 2, 4, 8) divides it and the model's heads")
        if args.json:
            print(json.dumps({**rows[0], "candidates": rows}, indent=1))
        else:
            print(planner.format_inference(config, npus, seq, rows))
        return 0
    batch = batch or planner.default_global_batch(npus, seq)
    _check_positive(global_batch=batch)
    plans = planner.plan_training(config, npus, seq, batch, lora, degrees)
    if not plans:
        raise ValueError(f"--npus {npus} --seq-length {seq} --global-batch {batch}"
                         + (f" --layout {args.layout}" if args.layout else "")
                         + ": no legal layout (degrees must multiply to --npus, divide the heads and the batch)")
    if args.write:
        if not plans[0].fits:
            raise ValueError(f"--write {args.write}: no layout fits {planner.MEMORY_BUDGET:.0%} of 64 GB per NPU; "
                             f"nothing written")
        if not args.model:
            raise ValueError(f"--write {args.write}: needs --model (the preset or checkpoint the run YAML names)")
        text = planner.run_yaml(args.model, plans[0], seq, npus, args.write, lora)
        tmp = args.write + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.write)
    if args.json:
        best = plans[0].row()
        print(json.dumps({**best, "npus": npus, "seq_length": seq, "global_batch": batch, "mode": mode,
                          "candidates": [p.row() for p in plans[:args.top]]}, indent=1))
    else:
        print(planner.format_training(config, npus, seq, batch, mode, plans[:args.top], len(plans)))
        if args.write:
            print(f"wrote {args.write}")
    return 0
