"""Fixtures of the report tests: two short training stages of the tiny model run by the real Trainer, and a
tokenised dataset that went through the copyright-risk filter."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from engmoe_tiny_runs import train_tiny_stages  # noqa: E402

RISKY = ("Chapter 1\n\nThe Long Road\n\nCopyright © 2019 Example Press. All rights reserved. No part of this "
         "publication may be reproduced without permission.\n\nChapter 2\n\nISBN 978-0-306-40615-7\n")
CLEAN = ("The river flows slowly past the old mill and the children watch the boats.",
         "Il fiume scorre lento accanto al vecchio mulino.",
         "A short note about trains, bridges and the weather in the valley.")


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, demo_corpus) -> list[Path]:
    """Stage 1 (6 steps) and stage 2 (4 steps, init_from stage 1), checkpoints every 3 steps, TensorBoard on."""
    return train_tiny_stages(tmp_path_factory.mktemp("stages"), demo_corpus.root)


@pytest.fixture(scope="session")
def filtered_dataset(tmp_path_factory, demo_corpus) -> Path:
    """A dataset tokenised with the copyright filter at 0.3 (one risky document among four); its root dir."""
    from engmoe.data_prep.tokenize import TokenizeJob, run_job

    root = tmp_path_factory.mktemp("filtered")
    raw = root / "raw.jsonl"
    raw.write_text("\n".join(json.dumps({"text": t}) for t in (*CLEAN, RISKY)) + "\n")
    run_job(TokenizeJob(input=str(raw), output=str(root / "web-it"), tokenizer=str(demo_corpus.tokenizer_path),
                        name="web-it", source="test crawl", license="ODC-By-1.0", copyright_threshold=0.3,
                        progress=False, logging_dir=str(root / ".logs")))
    return root
