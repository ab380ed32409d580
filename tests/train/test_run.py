"""The training job: exact resume, atomic checkpoints (kill during a save or a prune), the output
directory's rules (one run at a time, no silent reuse), SIGTERM, metrics, TensorBoard, PNG, eval."""
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import yaml

from mindport.train.logger import read_metrics
from testkit.train import SEQ, VOCAB, assert_resumed_equals_straight, run_config


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_resume_continues_exactly(tmp_path, data_dir, level):
    """2N steps in one run == N steps, stop, resume for N more: bit for bit the same losses, grad
    norms and LRs at every step, and the same final weights, optimiser moments and data position.

    (This needs the loss's log to be reproducible: MindSpore's fp32 CPU Log kernel rounds an
    element differently depending on the thread split it auto-tunes over its first launches in a
    process, so the cross-entropy uses log1p; see mindport.parallel.layers.log_shifted_sum.)
    """
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run import train

    n = 3
    extra = dict(amp_level=level, loss_scale=1024.0 if level == "O2" else 1.0, train_steps=2 * n, save_steps=n)
    straight = train(run_config(str(tmp_path / "straight"), data_dir, **extra), progress=False, echo=lambda s: None)
    assert straight.steps == 2 * n
    part = run_config(str(tmp_path / "split"), data_dir, **extra)
    first = train(part, stop_after=n, progress=False, echo=lambda s: None)
    assert first.steps == n and first.checkpoint.endswith(f"step_{n:08d}")
    second = train(part, resume=True, progress=False, echo=lambda s: None)
    assert second.steps == 2 * n
    assert [m["step"] for m in read_metrics(str(tmp_path / "split"))] == list(range(1, 2 * n + 1))
    (_, _, sa), (_, _, sb) = assert_resumed_equals_straight(str(tmp_path / "straight"), str(tmp_path / "split"),
                                                            straight.checkpoint, second.checkpoint,
                                                            CheckpointManager(str(tmp_path)))
    assert sa["data"] == sb["data"] and sa["step"] == sb["step"] == 2 * n


def test_checkpoint_is_a_loadable_model_dir_and_old_ones_are_pruned(tmp_path, data_dir):
    from mindport import AutoModelForCausalLM
    from mindport.tokenizer import Tokenizer
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run import train

    out = str(tmp_path / "run")
    result = train(run_config(out, data_dir, train_steps=4, save_steps=1, keep_checkpoints=2), progress=False,
                   echo=lambda s: None)
    ckpts = CheckpointManager(os.path.join(out, "checkpoints"))
    assert ckpts.steps() == [3, 4] and result.checkpoint == ckpts.path(4)
    assert not [n for n in os.listdir(ckpts.directory) if n.startswith(".")]
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    weights, arrays, state = ckpts.load(result.checkpoint)
    for name, param in model.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), weights[name])
    assert state["step"] == 4 and state["data"]["consumed"] == 8 and "exp_avg.embed.weight" in arrays
    assert Tokenizer.load(result.checkpoint).vocab_size == VOCAB

    # metrics, TensorBoard events, loss curve
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "mfu"} <= set(m) for m in metrics)
    from mindport.train.tensorboard import read_records

    tb_dir = os.path.join(out, "tensorboard")
    records = read_records(os.path.join(tb_dir, os.listdir(tb_dir)[0]))
    assert b"brain.Event:2" in records[0] and len(records) == 5
    assert b"train/loss" in records[1] and struct.pack("<f", metrics[0]["loss"]) in records[1]
    with open(result.plot, "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


def test_crc32c_known_vector():
    from mindport.train.tensorboard import crc32c

    assert crc32c(b"123456789") == 0xE3069283


def _yaml(tmp_path, data_dir, out, steps=4, **runner):
    doc = yaml.safe_load(open("configs/telechat2/tiny_train.yaml"))
    doc["model"]["model_config"]["vocab_size"] = VOCAB
    doc["output_dir"] = out
    doc["train_dataset"] = {"data_dir": data_dir}
    doc["lr_schedule"]["total_steps"] = steps
    doc["runner_config"].update(dict(batch_size=2, seq_length=SEQ, peak_tflops=1.0, **runner))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, data_dir):
    from mindport import AutoModelForCausalLM
    from mindport.train.config import load_yaml
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run import train

    out = str(tmp_path / "run")
    config = _yaml(tmp_path, data_dir, out, save_steps=2)
    env = dict(os.environ, MINDPORT_TEST_SLOW_SAVE="4:60", GLOG_v="3")
    proc = subprocess.Popen([sys.executable, "-m", "mindport.cli", "train", "--config", config, "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt_dir = os.path.join(out, "checkpoints")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            tmp = [n for n in names if n.startswith(".tmp-step_00000004")]
            if tmp and os.path.isfile(os.path.join(ckpt_dir, tmp[0], "model.safetensors")):
                break  # the step-4 save is under way (sleeping after its first file)
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = CheckpointManager(ckpt_dir)
    assert ckpts.steps() == [2]
    model = AutoModelForCausalLM.from_pretrained(ckpts.latest())
    assert model.config.vocab_size == VOCAB
    result = train(load_yaml(config), resume=True, progress=False, echo=lambda s: None)
    assert result.steps == 4 and CheckpointManager(ckpt_dir).steps() == [2, 4]
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp")]  # the killed save's leftovers are gone
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def _mindport(*args, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "mindport.cli", *args], env=dict(os.environ, GLOG_v="3", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for(condition, proc, what, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.1)
    assert proc.poll() is None and condition(), f"{what}: {proc.communicate(timeout=30)}"


def _signal_after_two_steps(run, out: str, signum: int, meanwhile=None) -> tuple[str, str]:
    """Once training run ``run`` (writing to ``out``) has logged two steps: ``meanwhile()``, then send
    ``signum`` and wait for it to end; its (stdout, stderr). A run still alive afterwards is killed."""
    try:
        _wait_for(lambda: len(read_metrics(out)) >= 2, run, "two steps")
        if meanwhile:
            meanwhile()
        run.send_signal(signum)
        return run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()


def test_kill_during_pruning_leaves_only_complete_checkpoints(tmp_path, data_dir):
    """A deletion renames the checkpoint away first: killed while deleting, no step_* directory is
    half there (eval --load works on every one), and the next start removes the leftover."""
    from mindport import AutoModelForCausalLM
    from mindport.train.config import load_yaml
    from mindport.train.run import train

    out = str(tmp_path / "run")
    config = _yaml(tmp_path, data_dir, out, save_steps=1, keep_checkpoints=1)
    ckpt_dir = os.path.join(out, "checkpoints")
    proc = _mindport("train", "--config", config, "--no-progress", env={"MINDPORT_TEST_SLOW_PRUNE": "60"})
    try:  # step 2's save prunes step 1 and sleeps between renaming it away and deleting it
        _wait_for(lambda: os.path.isdir(ckpt_dir) and any(n.startswith(".trash-step_00000001")
                                                          for n in os.listdir(ckpt_dir)), proc, "prune")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    names = sorted(os.listdir(ckpt_dir))
    assert names[0].startswith(".trash-step_00000001") and names[1:] == ["step_00000002"]
    assert AutoModelForCausalLM.from_pretrained(os.path.join(ckpt_dir, "step_00000002")).config.vocab_size == VOCAB
    result = train(load_yaml(config), resume=True, progress=False, echo=lambda s: None)  # the lock died with it
    assert result.steps == 4 and sorted(os.listdir(ckpt_dir)) == ["step_00000004"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_a_start_removes_half_checkpoints_and_leftovers(tmp_path):
    """What older versions or killed saves left: a step directory holding only train_state/, temporary
    and trash directories. A checkpoint is complete or absent."""
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run_dir import RunDirectory

    ckpt_dir = tmp_path / "checkpoints"
    for name in ("step_00000002/train_state", ".tmp-step_00000005-123/train_state", ".trash-step_00000001-9-9/x",
                 "step_00000004/train_state"):
        (ckpt_dir / name).mkdir(parents=True)
    (ckpt_dir / "step_00000002/train_state/state.json").write_text("{}")
    (ckpt_dir / "step_00000004/train_state/state.json").write_text("{}")
    (ckpt_dir / "step_00000004/config.json").write_text("{}")
    (tmp_path / ".trash-tensorboard-9-9").mkdir()  # an --overwrite killed while deleting
    assert CheckpointManager(str(ckpt_dir)).steps() == [4]
    lines = []
    with RunDirectory(str(tmp_path)) as run_dir:
        run_dir.open(resume=True, overwrite=False, echo=lines.append)
    assert os.listdir(ckpt_dir) == ["step_00000004"] and not (tmp_path / ".trash-tensorboard-9-9").exists()
    assert lines == [f"removed what an interrupted run left in {tmp_path}: .trash-tensorboard-9-9, "
                     f".tmp-step_00000005-123, .trash-step_00000001-9-9, step_00000002"]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Keep-last-K counts the steps up to the one just saved; a checkpoint past it is not this run's
    to prune (the case a new run into an old run's directory used to hit)."""
    from mindport.train.checkpoint import CheckpointManager
    from testkit.train import tiny_model_config

    ckpts = CheckpointManager(str(tmp_path), keep=2)

    def save(step):
        ckpts.save(step, tiny_model_config(), {"w": np.zeros(2, np.float32)}, {"s": np.zeros(1, np.float32)},
                   {"step": step})

    for step in (5, 6, 1):
        save(step)
    assert ckpts.steps() == [1, 5, 6]
    save(2)
    save(3)
    assert ckpts.steps() == [2, 3, 5, 6]


def test_a_new_run_refuses_a_previous_runs_directory_unless_overwrite(tmp_path, data_dir):
    """Run twice into one directory: the second refuses in one line (no --resume, no --overwrite);
    --overwrite deletes the old run's checkpoints, metrics, events and curve, so nothing of it mixes
    with the new run, whose own checkpoints survive pruning; but only once the new run can start."""
    from mindport.train.config import load_yaml
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run import train

    out = str(tmp_path / "run")
    first = train(load_yaml(_yaml(tmp_path, data_dir, out, steps=6, save_steps=1)), progress=False,
                  echo=lambda s: None)
    ckpts = CheckpointManager(os.path.join(out, "checkpoints"))
    assert first.steps == 6 and ckpts.steps() == [5, 6]
    config = _yaml(tmp_path, data_dir, out, steps=4, save_steps=1)
    again = _mindport("train", "--config", config, "--no-progress")
    stdout, stderr = again.communicate(timeout=240)
    assert again.returncode == 2 and stderr.strip() == (
        f"mindport: error: {out}: holds a previous run (checkpoints, metrics.jsonl, tensorboard, loss_curve.png): "
        f"pass --resume to continue it or --overwrite to delete it first"), stderr
    assert ckpts.steps() == [5, 6] and len(read_metrics(out)) == 6  # untouched
    broken = load_yaml(config, [f"train_dataset.data_dir={tmp_path / 'no_data'}"])
    with pytest.raises(Exception, match="no_data"):  # --overwrite of a run that cannot start deletes nothing
        train(broken, overwrite=True, progress=False, echo=lambda s: None)
    assert ckpts.steps() == [5, 6] and len(read_metrics(out)) == 6

    lines = []
    second = train(load_yaml(config), overwrite=True, progress=False, echo=lines.append)
    assert lines[0].startswith("overwrite: deleted the previous run's checkpoints, metrics.jsonl")
    assert second.checkpoint == ckpts.path(4) and ckpts.steps() == [3, 4]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    assert not [n for n in os.listdir(ckpts.directory) if n.startswith(".")]


def test_second_run_at_once_fails_and_sigterm_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, data_dir):
    """A run holds its output directory: a second one fails at once naming it and the holder's pid.
    SIGTERM: the step under way finishes, a checkpoint is saved and named, exit code 143; --resume
    then continues exactly as an uninterrupted run."""
    from mindport.train.config import load_yaml
    from mindport.train.checkpoint import CheckpointManager
    from mindport.train.run import train

    steps = 1000  # the LR schedule's length; the run is stopped long before
    out = str(tmp_path / "run")
    config = _yaml(tmp_path, data_dir, out, steps=steps, save_steps=1)
    run = _mindport("train", "--config", config, "--no-progress", env={"MINDPORT_TEST_SLOW_SAVE": "0.3"})

    def second_run_fails_at_once():
        second = _mindport("train", "--config", config, "--no-progress", "--resume")
        _, stderr = second.communicate(timeout=240)
        assert second.returncode == 2 and stderr.strip() == (
            f"mindport: error: {out}: in use by another training run (pid {run.pid}; lock "
            f"{out}/.mindport-train.lock): wait for it to end or choose another output_dir"), stderr

    stdout, stderr = _signal_after_two_steps(run, out, signal.SIGTERM, meanwhile=second_run_fails_at_once)
    assert run.returncode == 143, stderr[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    ckpts = CheckpointManager(os.path.join(out, "checkpoints"))
    assert ckpts.latest() == ckpts.path(stopped) and not [n for n in os.listdir(ckpts.directory) if n[0] == "."]
    assert f"SIGTERM: stopped after step {stopped}; checkpoint {ckpts.path(stopped)} (continue with --resume)" in stdout

    resumed = train(load_yaml(config), resume=True, stop_after=stopped + 2, progress=False, echo=lambda s: None)
    assert resumed.steps == stopped + 2
    straight_out = str(tmp_path / "straight")
    train(load_yaml(_yaml(tmp_path, data_dir, straight_out, steps=steps, save_steps=1)), stop_after=stopped + 2,
          progress=False, echo=lambda s: None)
    a, b = read_metrics(straight_out), read_metrics(out)
    assert [m["step"] for m in b] == list(range(1, stopped + 3))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_array_equal([m[key] for m in b], [m[key] for m in a], err_msg=key)


def test_ctrl_c_between_compiled_steps_stops_with_130(tmp_path, data_dir):
    """SIGINT after MindSpore's graph runner has swapped in its own SIGINT handler (which reports
    SIGTERM): the run still knows it was Ctrl-C, saves after the step and exits 130."""
    from mindport.train.checkpoint import CheckpointManager

    out = str(tmp_path / "run")
    run = _mindport("train", "--config", _yaml(tmp_path, data_dir, out, steps=1000, save_steps=1), "--no-progress",
                    env={"MINDPORT_TEST_SLOW_SAVE": "2:5"})  # step 2's save waits 5 s: the signal lands there
    stdout, stderr = _signal_after_two_steps(run, out, signal.SIGINT)
    assert run.returncode == 130, stderr[-3000:]
    assert f"SIGINT: stopped after step 2; checkpoint {CheckpointManager(out + '/checkpoints').path(2)}" in stdout


def test_first_sigint_asks_to_stop_and_the_handlers_are_restored_after_the_run():
    from mindport.train.run import StopRequest

    before = signal.getsignal(signal.SIGINT)
    lines = []
    with StopRequest(lines.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a request
        time.sleep(0.1)
        assert stop.signum == signal.SIGINT
    assert lines == ["SIGINT: stopping after this step with a checkpoint (again to stop now)"]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, data_dir):
    """DP2 + ZeRO under msrun, SIGTERM to rank 0 only, no periodic saves: the one checkpoint, written
    after the stop, holds both ranks' optimizer slices, so rank 1 stopped after the same step and
    saved with rank 0 (a rank running on would leave rank 0 waiting in the save's collectives).

    Rank 0 names the checkpoint after every rank's part is written; the job is then ended with
    msrun's own Ctrl-C (kill every process): at the first rank's exit code 143 msrun kills the
    others and waits ~30 s for their heartbeats, which proves nothing here."""
    from mindport import cli
    from mindport.train.checkpoint import CheckpointManager
    from testkit.launch import free_port

    out = str(tmp_path / "run")
    config = _yaml(tmp_path, data_dir, out, steps=1000)
    doc = yaml.safe_load(open(config))
    doc["parallel_config"].update(data_parallel=2, optimizer_shard=True)
    with open(config, "w") as f:
        yaml.safe_dump(doc, f)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")
    log_dir = tmp_path / "log"
    job = subprocess.Popen([os.path.join(bin_dir, "msrun"), "--worker_num=2", "--local_worker_num=2",
                            f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True", cli.__file__,
                            "train", "--config", config, "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    lock = os.path.join(out, ".mindport-train.lock")

    def rank0_log() -> str:
        return (log_dir / "worker_0.log").read_text(errors="replace")

    try:
        _wait_for(lambda: len(read_metrics(out)) >= 2, job, "two steps", seconds=400)
        rank0 = int(open(lock).read())
        os.kill(rank0, signal.SIGTERM)
        _wait_for(lambda: "SIGTERM: stopped after step" in rank0_log(), job, "the stop's checkpoint", seconds=300)
        job.send_signal(signal.SIGINT)
        job.wait(60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    log = rank0_log()
    stopped = read_metrics(out)[-1]["step"]
    ckpts = CheckpointManager(os.path.join(out, "checkpoints"))
    assert ckpts.steps() == [stopped], log[-3000:]
    assert f"SIGTERM: stopped after step {stopped}; checkpoint {ckpts.path(stopped)}" in log
    assert sorted(os.listdir(os.path.join(ckpts.path(stopped), "train_state"))) == [
        "rank_00000.safetensors", "rank_00001.safetensors", "state.json"]


def test_fine_tuning_takes_the_architecture_and_reported_size_from_the_checkpoint(tmp_path, data_dir):
    """With load_checkpoint and no model_config the checkpoint's model trains, and the parameter count
    and MFU reported are its own."""
    from mindport import AutoModelForCausalLM
    from mindport.train.config import load_yaml
    from mindport.train.flops import train_flops_per_token
    from mindport.train.run import train
    from testkit.train import tiny_model_config

    base = tiny_model_config(num_layers=3)
    model = AutoModelForCausalLM.from_config(base)
    model.init_weights(0)
    model.save_pretrained(str(tmp_path / "base"))
    doc = yaml.safe_load(open(_yaml(tmp_path, data_dir, str(tmp_path / "run"))))
    del doc["model"]
    doc["load_checkpoint"] = str(tmp_path / "base")
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(doc))
    run = load_yaml(str(tmp_path / "finetune.yaml"))
    assert run.model == base
    lines = []
    result = train(run, stop_after=1, progress=False, echo=lines.append)
    assert f"training: {base.num_parameters() / 1e6:.2f}M parameters" in "\n".join(lines)
    tuned = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert tuned.config.num_layers == 3
    metrics = read_metrics(str(tmp_path / "run"))[0]
    assert metrics["flops_per_s"] / metrics["tokens_per_s"] == pytest.approx(train_flops_per_token(base, SEQ))
    assert metrics["mfu"] == pytest.approx(metrics["flops_per_s"] / 1e12)  # peak_tflops 1.0


def test_eval_perplexity_is_exp_of_mean_loss(tmp_path, data_dir):
    import math

    from mindport.train.data import PackedDataset
    from mindport.train.evaluate import evaluate
    from testkit.train import tiny_model

    model = tiny_model()
    ds = PackedDataset(data_dir)
    result = evaluate(model, ds, batch_size=3, max_samples=7)
    assert result.samples == 7 and result.tokens == 7 * (SEQ - 1)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    ids = np.stack([ds[i] for i in range(7)])
    direct = float(model(ids, labels=ids).asnumpy())
    assert result.loss == pytest.approx(direct, rel=1e-5)
