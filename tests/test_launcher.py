"""scripts/msrun_launcher.sh: the single-node forms wait for the job and return its exit code (with the
failing worker's log), a busy port is replaced by a free one there and fails at once in the multi-node form."""
import os
import socket
import subprocess
import sys

import pytest

from testkit.launch import free_port

LAUNCHER = os.path.join(os.path.dirname(__file__), "..", "scripts", "msrun_launcher.sh")
DEFAULT_PORT = 8118

JOB = """\
import os, sys
from mindspore.communication import get_rank, init

init()
rank = get_rank()
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write("ran")
print(f"rank {rank} wrote its file", flush=True)
sys.exit(int(sys.argv[2]) if rank == 1 else 0)
"""


def launch(tmp_path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the launcher from ``tmp_path`` (its default LOG_DIR output/msrun_log lands there)."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")
    return subprocess.run(["bash", LAUNCHER, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def job(tmp_path, rank1_exit_code: int) -> str:
    """The launcher's CMD: 2 ranks join the cluster, each writes ``rank{r}.txt``, rank 1 exits with the code."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return f"{script} {tmp_path} {rank1_exit_code}"


def listening_socket(port: int) -> socket.socket | None:
    """Hold ``port`` busy (None if it is busy already: another listener, or TIME_WAIT after an earlier job)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


@pytest.mark.slow
def test_failing_job_returns_its_exit_code_and_the_failing_workers_log(tmp_path):
    proc = launch(tmp_path, job(tmp_path, 3), "2")
    assert proc.returncode == 3, proc.stderr
    assert "worker 1 exited with code 3; the end of output/msrun_log/worker_1.log:" in proc.stderr
    assert "rank 1 wrote its file" in proc.stderr


@pytest.mark.slow
def test_succeeding_job_is_joined_and_a_busy_default_port_is_replaced(tmp_path):
    held = listening_socket(DEFAULT_PORT)
    try:
        proc = launch(tmp_path, job(tmp_path, 0), "2")
    finally:
        if held:
            held.close()
    assert proc.returncode == 0, proc.stderr
    assert f"port {DEFAULT_PORT} is in use; using " in proc.stderr
    for rank in (0, 1):  # the job had finished when the launcher returned
        assert (tmp_path / f"rank{rank}.txt").read_text() == "ran"


def test_multi_node_form_with_a_busy_port_fails_at_once_in_one_line(tmp_path):
    port = free_port()
    held = listening_socket(port)
    try:
        proc = launch(tmp_path, job(tmp_path, 0), "4", "2", "127.0.0.1", str(port), "0", "logs", "True", "60",
                      timeout=30)  # msrun would have waited up to 60 s
    finally:
        held.close()
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"msrun_launcher.sh: error: MASTER_PORT = {port}: in use on 127.0.0.1 (or in TIME_WAIT "
                                        "after an earlier job): expected a free port (the same on every node)"]
    assert not (tmp_path / "logs").exists()  # nothing was started


STOPPABLE = """\
import os, signal, sys, time
from mindspore.communication import get_rank, init

init()
rank = get_rank()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
open(os.path.join(sys.argv[1], f"started{rank}"), "w").close()
while not stop:
    time.sleep(0.05)
time.sleep(2 if rank == 0 else 0)  # rank 0 saves slower: rank 1 has ended (143) while it saves
open(os.path.join(sys.argv[1], f"saved{rank}"), "w").close()  # what mindport train does: finish the step, save
sys.exit(143)
"""


@pytest.mark.slow
@pytest.mark.parametrize("as_terminal, code", [(True, 130), (False, 143)])
def test_ctrl_c_or_sigterm_reaches_every_worker_and_the_launcher_returns_after_them(tmp_path, as_terminal, code):
    """A terminal's Ctrl-C (SIGINT to the launcher's whole process group) or `kill` of the launcher:
    every worker gets SIGTERM and finishes (mindport train saves a checkpoint) before the launcher
    returns 130 / 143; msrun itself never SIGKILLs them, not even a rank still saving after another
    rank's 143 (msrun kills the others at a worker's non-zero exit, then waits ~30 s for their heartbeats)."""
    import signal
    import time

    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")
    proc = subprocess.Popen(["bash", LAUNCHER, f"{script} {tmp_path}", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not all((tmp_path / f"started{r}").exists() for r in (0, 1)) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        if as_terminal:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, stderr
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists(), stderr
    msrun_log = (tmp_path / "output" / "msrun_log" / "msrun.log").read_text()
    assert "exit with exception" not in msrun_log, msrun_log  # msrun's words before it kills the other workers


def test_a_command_that_is_no_script_fails_at_once_in_one_line(tmp_path):
    held = listening_socket(DEFAULT_PORT)  # busy (or in TIME_WAIT after the jobs above): no port notice first
    try:
        proc = launch(tmp_path, "echo hello", "2", timeout=60)
    finally:
        if held:
            held.close()
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "msrun_launcher.sh: error: CMD = 'echo hello': expected a Python script with its arguments or a "
        "mindport command"), proc.stderr
