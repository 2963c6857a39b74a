"""bench/step_share_table.py: the ratios that go into the README's issue-11 table (after/before/megatron-core)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _row(variant: str, tps: float, mb: int = 1, model: str = "ep4-share") -> dict:
    return {"variant": variant, "tokens_per_s": tps, "step_ms": 32 * 4096 / tps * 1e3, "micro_batch": mb,
            "model": model, "mfu": 0.4, "busy_share": 0.98, "peak_mem_gib": 99.0,
            "expert_load_min": 0.5, "expert_load_max": 1.5, "categories_ms_per_step": {}}


def test_after_variants_compare_to_the_before_variant_of_the_same_shape(tmp_path):
    (tmp_path / "before.json").write_text(json.dumps([_row("mock-mb1", 18000.0), _row("mock-mb2", 22000.0, mb=2)]))
    (tmp_path / "after.json").write_text(json.dumps([
        _row("mock-mb1-graphs", 21600.0), _row("forced-mb2-graphs", 24200.0, mb=2),
        _row("proxy-mb4", 90000.0, mb=4, model="proxy"), {"variant": "text-mb1-graphs", "error": "skipped: time budget"}]))
    (tmp_path / "mcore.json").write_text(json.dumps({"summary": [{"micro_batch": 1, "tokens_per_s": 12000.0}]}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_share_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    ratios = {line.split()[0]: line.split()[1:] for line in out.split("ratios")[1].splitlines()[1:] if line.strip()}
    assert ratios["mock-mb1-graphs"] == ["1.20x", "(mock-mb1)", "1.80x"]
    assert ratios["forced-mb2-graphs"] == ["1.10x", "(mock-mb2)", "n/a"]  # no megatron-core run at mb2
    assert ratios["proxy-mb4"] == ["n/a", "(-)", "n/a"]  # another model: no before, no anchor
    assert "skipped: time budget" in out
