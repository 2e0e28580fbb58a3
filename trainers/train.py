"""`hf-prune train` as a script, for launchers that take a file: ``accelerate launch trainers/train.py MODEL ...``.

Every option is `hf-prune train`'s (``python trainers/train.py --help``); the program itself is
:mod:`hf_prune.cli.train`.
"""
import sys

from hf_prune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
