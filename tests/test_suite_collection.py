"""The suite runs however it is invoked: any folders together, any file alone."""
import glob
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_no_test_imports_helpers_from_conftest():
    """pytest imports every conftest.py as the module ``conftest``: importing from it picks one at random."""
    sources = {path: open(path).read() for path in glob.glob(os.path.join(TESTS, "**", "*.py"), recursive=True)
               if os.path.abspath(path) != os.path.abspath(__file__)}
    assert [path for path, text in sources.items() if "from conftest" in text or "import conftest" in text] == []


@pytest.mark.parametrize("folders", [("parallel", "train"), ("ckpt_tools", "models", "infer", "train"),
                                     ("train/test_run.py", "parallel/test_expert_parallel.py")])
def test_folders_collect_together(folders):
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *[os.path.join(TESTS, f) for f in folders]],
                          cwd=os.path.dirname(TESTS), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
