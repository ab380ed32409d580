"""Launch a script on N CPU processes with msrun, as tests do, and compare what the ranks dumped."""
import json
import os
import socket
import subprocess
import sys

import numpy as np


def single_process_dump(worker: str, hf_dir: str, out_dir: str) -> dict:
    """Run ``worker`` on one process (no layout: the reference) and load its rank0.npz."""
    subprocess.run([sys.executable, worker, hf_dir, out_dir], check=True, capture_output=True)
    return dict(np.load(os.path.join(out_dir, "rank0.npz")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(script: str, args: list[str], workers: int, log_dir: str, timeout: int = 600) -> None:
    """Run ``script`` on ``workers`` local processes; raise with the workers' last log lines on failure."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")
    cmd = [os.path.join(bin_dir, "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True", script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tails = []
        for name in sorted(os.listdir(log_dir)):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                lines = [l for l in f.read().splitlines() if "WARNING" not in l]
            tails.append(f"--- {name}\n" + "\n".join(lines[-15:]))
        raise AssertionError(f"msrun failed ({proc.returncode}):\n" + "\n".join(tails))


def shared_launches(jobs: dict[str, tuple[str, int, list[str]]], root: str):
    """``jobs``: name -> (launch, world size, [script, *arguments]), each job writing to ROOT/name
    (which its arguments name). Returns ``run(name)`` -> ROOT/name once job ``name`` has run: the jobs
    with one ``launch`` key (and world size) run one after the other in one msrun launch of
    ``script_runner.py`` (logs in ROOT/logs/LAUNCH), started at the first ``run`` of any of them.
    A failed launch fails each of its jobs with its error, without launching again."""
    runner = os.path.join(os.path.dirname(__file__), "script_runner.py")
    outcome: dict[str, AssertionError | None] = {}

    def run(name: str) -> str:
        launch, world, _ = jobs[name]
        if name not in outcome:
            names = [n for n, (l, _, _) in jobs.items() if l == launch]
            assert {jobs[n][1] for n in names} == {world}, f"launch {launch}: jobs of different world sizes"
            try:
                msrun(runner, [json.dumps([jobs[n][2] for n in names])], world, os.path.join(root, "logs", launch),
                      timeout=300 * (len(names) + 1))
                outcome.update(dict.fromkeys(names))
            except AssertionError as err:
                outcome.update(dict.fromkeys(names, err))
        if outcome[name] is not None:
            raise outcome[name]
        return os.path.join(root, name)

    return run


def layout_runs(worker: str, runs: dict[str, tuple[str, dict]], root: str, *extra: str):
    """``runs``: name -> (model directories joined by ',', layout) for ``worker MODEL_DIRS OUT_DIR
    LAYOUT_JSON *extra`` (step_worker.py); the runs of one world size share a launch. Returns
    :func:`shared_launches`' ``run``."""
    from mindport import ParallelConfig

    jobs = {}
    for name, (model_dirs, layout) in runs.items():
        world = ParallelConfig.from_dict(layout).world_size
        jobs[name] = (f"world{world}", world, [worker, model_dirs, os.path.join(root, name), json.dumps(layout),
                                               *extra])
    return shared_launches(jobs, root)


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str, rel: float = 1e-5) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(ours - ref).max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"


def rank_dumps(out_dir: str, world: int) -> list[dict]:
    """Every rank's rank{r}.npz from ``out_dir``, in rank order."""
    return [dict(np.load(os.path.join(out_dir, f"rank{r}.npz"))) for r in range(world)]


def assert_replicas_identical(dumps: list[dict], kinds: tuple[str, ...] = ("param:",)) -> int:
    """Every slice of a parameter that several ranks hold (data-/context-parallel replicas, and the
    tp ranks of a replicated parameter) is bit-identical on all of them.

    ``dumps``: one mapping per rank with its coordinates (``coord:tp``, optionally ``coord:ep``)
    and entries ``...{kind}NAME`` for each kind (any prefix before it, e.g. a step, is part of the
    entry's identity). Returns the number of copies compared.
    """
    from mindport.parallel.sharding import rule_for

    copies: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    for rank, dump in enumerate(dumps):
        for key, value in dump.items():
            kind = next((k for k in kinds if k in key), None)
            if kind is None:
                continue
            head, _, name = key.rpartition(kind)
            rule = rule_for(name)
            tp = int(dump["coord:tp"]) if rule.tp_axis is not None else None
            ep = int(dump.get("coord:ep", 0)) if rule.ep_axis is not None else None
            copies.setdefault((head + kind, name, tp, ep), []).append((rank, value))
    compared = 0
    for (kind, name, _, _), held in copies.items():
        first_rank, first = held[0]
        for rank, value in held[1:]:
            differ = int((value != first).sum()) if value.shape == first.shape else value.size
            assert value.shape == first.shape and value.tobytes() == first.tobytes(), \
                f"{kind}{name}: rank {rank} differs from rank {first_rank} in {differ} of {first.size} elements"
            compared += 1
    return compared


def assert_layout_equals_single_process(dumps: list[dict], ref: dict, layout: dict, rel: float = 1e-5) -> None:
    """Step-worker dumps of a parallel run against the single-process one: each rank's loss (last
    pipeline stage), global gradient norm, logits of its data-parallel rows, and its slice of every
    gradient and updated parameter; every parameter lives on some rank; replicas are bit-identical."""
    from mindport.parallel.sharding import shard_slices

    tp, ep, dp = (layout.get(k, 1) for k in ("model_parallel", "expert_parallel", "data_parallel"))
    seen = set()
    for rank, dump in enumerate(dumps):
        last_stage = int(dump["coord:pp"]) == layout.get("pipeline_stage", 1) - 1
        assert ("loss" in dump) == last_stage
        if last_stage:
            assert_close(dump["loss"], ref["loss"], f"rank {rank} loss", rel)
        assert_close(dump["grad_norm"], ref["grad_norm"], f"rank {rank} grad norm", rel)
        if "logits" in dump:
            batch, dp_rank = ref["logits"].shape[0], int(dump["coord:dp"])
            rows = slice(dp_rank * batch // dp, (dp_rank + 1) * batch // dp)
            assert_close(dump["logits"], ref["logits"][rows], f"rank {rank} logits", rel)
        tp_rank, ep_rank = int(dump["coord:tp"]), int(dump.get("coord:ep", 0))
        names = [k[5:] for k in dump if k.startswith("grad:")]
        seen.update(names)
        for name in names:
            index = shard_slices(name, ref["grad:" + name].shape, tp_rank, tp, ep_rank, ep)
            for kind in ("grad:", "param:"):
                assert_close(dump[kind + name], ref[kind + name][index], f"rank {rank} {kind}{name}", rel)
    assert seen == {k[5:] for k in ref if k.startswith("grad:")}  # every parameter lives on some rank
    assert_replicas_identical(dumps)


def assert_checkpoint_replicas_identical(step_dir: str) -> int:
    """:func:`assert_replicas_identical` on a per-rank checkpoint (``layout.json`` + ``rank_XXXX/``):
    every tensor slice that several rank directories hold is bit-identical in all of them."""
    from mindport.train.checkpoint import read_safetensors

    with open(os.path.join(step_dir, "layout.json")) as f:
        layout = json.load(f)
    dumps = []
    for entry in layout["ranks"]:
        rank_dir = os.path.join(step_dir, entry["dir"])
        dump = {"coord:tp": np.array(entry["tp_rank"]), "coord:ep": np.array(entry["ep_rank"])}
        for name in sorted(os.listdir(rank_dir)):
            if name.endswith(".safetensors"):
                dump.update({"param:" + k: v for k, v in read_safetensors(os.path.join(rank_dir, name)).items()})
        dumps.append(dump)
    return assert_replicas_identical(dumps)
