"""Write the tiny model's checkpoint under several 2-rank layouts (one torchrun launch for all of them).

    torchrun --nproc-per-node 2 tests/export/layout_save_worker.py --out DIR --seed 7

Each layout builds the model with the same seed (initialisation is layout-independent, so every layout
holds slices of the single-process model) and saves it with the trainer's ``save_checkpoint`` into
``DIR/<layout>``. The export test then checks that ``export-hf`` of each equals the single-process export.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

LAYOUTS = {
    "tp2_sp": {"tensor": 2, "sequence_parallel": True},
    "pp2": {"pipeline": 2},
    "ep2_dp2": {"expert": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()

    from engmoe.checkpoint.sharded import save_checkpoint
    from engmoe.checkpoint.train_state import TrainState
    from engmoe.config import load_config
    from engmoe.model import build_model
    from engmoe.parallel import destroy_parallel, initialize_parallel

    for name, parallel in LAYOUTS.items():
        out = Path(args.out) / name
        overrides = [f"parallel.{k}={json.dumps(v)}" for k, v in parallel.items()] + [f"stage.save_dir={out}"]
        cfg = load_config(model="tiny", overrides=overrides)
        initialize_parallel(cfg.parallel, cfg.model.num_layers, backend="gloo")
        model = build_model(cfg.model, cfg.parallel, seed=args.seed, device="cpu")
        save_checkpoint(out, 1, [model], None, {"trainer": asdict(TrainState(step=1, stage=name))}, cfg)
    destroy_parallel()


if __name__ == "__main__":
    main()
