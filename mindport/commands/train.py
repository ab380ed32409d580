"""``mindport train``: a training run from a mindformers-shaped YAML config."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config",
                       description="Train from a YAML run config (see configs/). Writes OUTPUT_DIR/metrics.jsonl, "
                                   "tensorboard/, loss_curve.png and checkpoints/step_XXXXXXXX/.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. runner_config.batch_size=8 (repeatable)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    start.add_argument("--overwrite", action="store_true",
                       help="delete a previous run's checkpoints, metrics, tensorboard/ and loss curve in OUTPUT_DIR "
                            "first (without it, a new run refuses an OUTPUT_DIR that holds them)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop after this many total steps (the LR schedule still spans train_steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from mindport.config import ConfigError
    from mindport.train.config import load_yaml
    from mindport.parallel.state import init_parallel
    from mindport.train.run import open_dataset, train

    run_config = load_yaml(args.config, args.overrides)
    if run_config.run_mode == "predict":
        raise ConfigError(f"{args.config}: key 'run_mode' = 'predict': expected 'train' or 'finetune' (a serving "
                          f"config: decode with `mindport generate` or scripts/run_infer.sh, size it with "
                          f"`mindport plan --config {args.config}`)")
    open_dataset(run_config, run_config.parallel.context_parallel)  # bad data fails before the ranks join
    init_parallel(run_config.parallel, run_config.model)  # under msrun: every rank, before any work
    result = train(run_config, resume=args.resume, stop_after=args.stop_after,
                   progress=False if args.no_progress else None, overwrite=args.overwrite)
    print(f"{'stopped' if result.stopped_by else 'done'}: step {result.steps}, loss "
          f"{result.last_loss if result.last_loss is not None else float('nan'):.4f}, {result.seconds:.1f} s; "
          f"checkpoint {result.checkpoint}; curve {result.plot}")
    return 128 + result.stopped_by if result.stopped_by else 0  # 130 SIGINT, 143 SIGTERM, as the shell reports
