"""Launch a script on N CPU processes with msrun, as tests do, and compare what the ranks dumped."""
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


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str, rel: float = 1e-5) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(ours - ref).max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"
