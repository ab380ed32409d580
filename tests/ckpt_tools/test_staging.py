"""StagingDir, the one way a directory is written (conversion, data prepare, merges): a killed
writer's staging directory is removed by the next writer, and results follow the umask."""
import os
import subprocess
import sys

from mindport.checkpoint.shards import StagingDir


def test_a_killed_writers_staging_directory_is_removed_and_a_running_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live = tmp_path / f".out.tmp-{dead}-abcd", tmp_path / f".out.tmp-{os.getppid()}-efgh"
    for d in (stale, live):
        d.mkdir()
        (d / "tokens.bin").write_bytes(b"x" * 10)
    with StagingDir(str(tmp_path / "out"), overwrite=False) as path:
        (tmp_path / "out.marker").write_text(path)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out", "out.marker"])


def test_the_result_has_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with StagingDir(str(tmp_path / "out"), overwrite=False):
            pass
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "out").st_mode & 0o777) == 0o755
