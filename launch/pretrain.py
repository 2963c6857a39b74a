"""Pretraining from a checkout: ``torchrun --nproc-per-node 8 launch/pretrain.py --stage 2 [...]``.

The same as ``torchrun ... -m engmoe.launch.pretrain`` (the code and its options are there), for a
checkout that is not installed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from engmoe.launch.pretrain import main  # noqa: E402

if __name__ == "__main__":
    from engmoe.errors import run_cli

    sys.exit(run_cli(main, prog="engmoe"))
