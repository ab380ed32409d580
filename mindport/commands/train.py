"""``mindport train``: a training run from a mindformers-shaped YAML config."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config",
                       description="Train from a YAML run config (see configs/). Writes OUTPUT_DIR/metrics.jsonl, "
                                   "tensorboard/, loss_curve.png and checkpoints/step_XXXXXXXX/.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. runner_config.batch_size=8 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop after this many total steps (the LR schedule still spans train_steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from mindport.config import load_yaml
    from mindport.train.run import train

    run_config = load_yaml(args.config, args.overrides)
    extra = data_parallel_setup(run_config) if run_config.parallel.world_size > 1 else {}
    result = train(run_config, resume=args.resume, stop_after=args.stop_after,
                   progress=False if args.no_progress else None, **extra)
    print(f"done: step {result.steps}, loss {result.last_loss if result.last_loss is not None else float('nan'):.4f}, "
          f"{result.seconds:.1f} s; checkpoint {result.checkpoint}; curve {result.plot}")
    return 0


def data_parallel_setup(run_config) -> dict:
    """Under msrun: initialise the groups and return the model and the gradient/loss reducers.

    ``mindport train`` runs pure data parallelism (every rank holds the whole model, so any
    rank's checkpoint is the model). Tensor, pipeline and context parallelism and optimizer
    sharding are implemented in mindport.parallel and tested step by step, but saving their
    per-rank checkpoints from this command is not wired yet: such layouts stop here.
    """
    import os

    from mindport.config import ConfigError
    from mindport.parallel.comm import ReduceFromGroup
    from mindport.parallel.grad_sync import GradientSync
    from mindport.parallel.state import init_parallel
    from mindport.train.run import build_model, seed_everything

    p = run_config.parallel
    unsupported = {k: v for k, v in (("model_parallel", p.model_parallel), ("pipeline_stage", p.pipeline_stage),
                                     ("context_parallel", p.context_parallel), ("expert_parallel", p.expert_parallel))
                   if v != 1}
    if unsupported or p.optimizer_shard:
        key, value = next(iter(unsupported.items())) if unsupported else ("optimizer_shard", True)
        raise ConfigError(f"parallel_config: key '{key}' = {value!r}: `mindport train` runs data parallelism only "
                          f"(data_parallel = world size); other layouts run through mindport.parallel")
    groups = init_parallel(p, run_config.model)
    if groups.global_rank:  # rank 0 owns the run directory
        run_config.train = run_config.train.replace(
            output_dir=os.path.join(run_config.train.output_dir, f"rank_{groups.global_rank}"))
    seed_everything(run_config.train.seed)  # the same initial weights as a single-process run
    model = build_model(run_config)
    return dict(model=model, grad_sync=GradientSync(model.trainable_params(), groups),
                loss_reduce=ReduceFromGroup(groups.dp))
