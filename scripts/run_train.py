#!/usr/bin/env python
"""Launch a training run: ``python scripts/run_train.py --config YAML [--set k=v ...] [--resume]``.

The same job as ``mindport train``; kept as a script so launchers (msrun) can start it per rank.
"""
import sys

from mindport.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
