"""Run several scripts one after the other in this process: under msrun, one launch for several jobs
(process start-up, MindSpore's import and the cluster join are paid once).

usage: script_runner.py '[["SCRIPT", "ARG", ...], ...]'

Each script runs as ``__main__`` with ``sys.argv = [SCRIPT, ARG, ...]``, as ``python SCRIPT ARG ...``
would run it; ``sys.exit(0)`` ends only that job. A later job's ``init_parallel`` sets up its own
layout's groups (the world size is the launch's).
"""
import json
import runpy
import sys


def main(jobs: list[list[str]]) -> None:
    for script, *args in jobs:
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as done:
            if done.code not in (None, 0):
                raise


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
