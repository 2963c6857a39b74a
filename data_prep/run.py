"""``engmoe-data`` from a checkout: ``python data_prep/run.py tokenize --input ... --output ...``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # required: datatrove's local executor starts workers with forkserver
    from engmoe.data_prep.cli import main

    sys.exit(main())
