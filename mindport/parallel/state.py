"""Process groups, built once from ``parallel_config``: the only global in mindport.

World order (outermost first): dp x pp x cp x tp, tp fastest, so a tensor-parallel group
(model_parallel <= 8) sits inside one 8-NPU node:

    rank = ((dp_i * pp + pp_i) * cp + cp_i) * tp + tp_i

Expert parallelism splits the data-parallel dimension: ep consecutive dp indices (same
pp, cp, tp coordinates) form an expert-parallel group; the ranks holding the same expert
shard (dp_i mod ep equal) form the expert-data-parallel group that averages expert grads.

Layers receive a :class:`ParallelGroups` handle; :func:`current` returns the registered
one (single-process groups until :func:`init_parallel` runs).
"""
from __future__ import annotations

from dataclasses import dataclass

from mindport.config import ConfigError, ModelConfig, ParallelConfig

DIMS = ("dp", "pp", "cp", "tp")


@dataclass(frozen=True)
class Group:
    """One process group as seen from this rank."""

    name: str  # communication group name ("" when size 1)
    ranks: tuple[int, ...]  # global ranks, in group order
    rank: int  # this process's index within ``ranks``

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class ParallelGroups:
    config: ParallelConfig
    global_rank: int
    tp: Group
    dp: Group
    pp: Group
    cp: Group
    ep: Group
    ep_dp: Group  # ranks holding the same expert shard
    pp_prev: Group  # (previous stage, this stage): point-to-point pair; size 1 on the first stage
    pp_next: Group  # (this stage, next stage); size 1 on the last stage
    world: Group  # every rank (barriers, run-wide reductions)

    @property
    def sequence_parallel(self) -> bool:
        return self.config.use_seq_parallel and self.tp.size > 1

    @property
    def coords(self) -> dict[str, int]:
        return coordinates(self.config, self.global_rank)


def coordinates(config: ParallelConfig, rank: int) -> dict[str, int]:
    sizes = dict(dp=config.data_parallel, pp=config.pipeline_stage, cp=config.context_parallel,
                 tp=config.model_parallel)
    coords = {}
    for dim in reversed(DIMS):
        coords[dim] = rank % sizes[dim]
        rank //= sizes[dim]
    return coords


def rank_of(config: ParallelConfig, dp: int = 0, pp: int = 0, cp: int = 0, tp: int = 0) -> int:
    return ((dp * config.pipeline_stage + pp) * config.context_parallel + cp) * config.model_parallel + tp


def group_ranks(config: ParallelConfig, rank: int) -> dict[str, tuple[int, ...]]:
    """Global ranks of every group ``rank`` belongs to (pure: no communication)."""
    c = coordinates(config, rank)
    sizes = dict(dp=config.data_parallel, pp=config.pipeline_stage, cp=config.context_parallel,
                 tp=config.model_parallel)
    out = {dim: tuple(rank_of(config, **{**c, dim: i}) for i in range(sizes[dim])) for dim in DIMS}
    ep = config.expert_parallel
    block = c["dp"] // ep * ep
    out["ep"] = tuple(rank_of(config, **{**c, "dp": block + i}) for i in range(ep))
    out["ep_dp"] = tuple(rank_of(config, **{**c, "dp": i}) for i in range(c["dp"] % ep, config.data_parallel, ep))
    stage, pp = c["pp"], out["pp"]
    out["pp_prev"] = pp[stage - 1:stage + 1] if stage > 0 else (rank,)
    out["pp_next"] = pp[stage:stage + 2]
    out["world"] = tuple(range(config.world_size))
    return out


def check_layout(config: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> None:
    """Fail before any work when the layout cannot run on ``world_size`` processes."""
    if config.world_size != world_size:
        raise ConfigError(
            f"parallel_config: data_parallel x pipeline_stage x context_parallel x model_parallel = "
            f"{config.data_parallel} x {config.pipeline_stage} x {config.context_parallel} x {config.model_parallel}"
            f" = {config.world_size}, but {world_size} processes were launched")
    if model is not None:
        config.check_model(model)


def groups_for(config: ParallelConfig, rank: int) -> ParallelGroups:
    """The groups ``rank`` would hold under ``config``, without any communication (planning, tests)."""
    return _make_groups(config, rank, lambda name, ranks: None)


def _make_groups(config: ParallelConfig, rank: int, create) -> ParallelGroups:
    groups = {}
    for key, ranks in group_ranks(config, rank).items():
        name = ""
        if len(ranks) > 1:
            kind = "pp_pair" if key in ("pp_prev", "pp_next") else key  # both neighbours name it alike
            name = f"{kind}-" + "-".join(map(str, ranks))
            create(name, list(ranks))
        groups[key] = Group(name, ranks, ranks.index(rank))
    return ParallelGroups(config, rank, **groups)


# set by msrun (MS_WORKER_NUM, MS_ROLE) or a rank-table launch (RANK_TABLE_FILE, RANK_SIZE)
LAUNCHER_ENV = ("MS_WORKER_NUM", "MS_ROLE", "RANK_TABLE_FILE", "RANK_SIZE")
_CURRENT: ParallelGroups | None = None
_CREATED: set[str] = set()


def ensure_group(name: str, ranks: list[int]) -> None:
    """Create communication group ``name`` once (MindSpore refuses a second creation); only
    member ranks may call it."""
    if name not in _CREATED:
        from mindspore.communication import create_group

        create_group(name, sorted(ranks))
        _CREATED.add(name)


def single_process() -> ParallelGroups:
    return groups_for(ParallelConfig(), 0)


def init_parallel(config: ParallelConfig, model: ModelConfig | None = None) -> ParallelGroups:
    """Initialise communication (when the world has more than one process) and every group."""
    global _CURRENT
    world, rank = 1, 0
    if config.world_size > 1:
        import os

        from mindspore.communication import get_group_size, get_rank, init

        if not any(os.environ.get(k) for k in LAUNCHER_ENV):
            raise ConfigError(f"parallel_config: {config.world_size} processes (data_parallel x pipeline_stage x "
                              f"context_parallel x model_parallel), but this process was not started by a launcher: "
                              f"run it under msrun (scripts/msrun_launcher.sh \"CMD\" {config.world_size})")

        launched = os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE")
        if launched:  # before joining: a rank failing after init() leaves the others waiting ~30 s for its heartbeat
            check_layout(config, int(launched), model)
        init()
        world, rank = get_group_size(), get_rank()
        create = ensure_group
    else:
        def create(name, ranks):
            raise AssertionError("single-process layout has no groups")
    check_layout(config, world, model)
    _CURRENT = _make_groups(config, rank, create)
    return _CURRENT


def current() -> ParallelGroups:
    return _CURRENT or single_process()
