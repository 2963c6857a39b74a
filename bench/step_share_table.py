"""The one table of bench/step_share.sh: before / after / megatron-core per variant, from the JSONs in a folder.

    python bench/step_share_table.py $OUT      # reads before.json, after.json, mcore.json (any may be missing)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KINDS = [("expert GEMM", "expert grouped GEMM"), ("dense GEMM", "dense GEMM"), ("attn", "attention"),
         ("main_grad+=", "fp32 grad accumulation (main_grad += grad)"), ("optim", "optimizer (AdamW, grad norm, clip)"),
         ("CE", "cross-entropy"), ("moe kern", "engmoe MoE kernels"), ("compiled", "fused elementwise (torch.compile)")]


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x):
    return f"{100 * x:5.1f}%" if isinstance(x, (int, float)) else "  n/a"


def _same_shape(candidates, r: dict):
    """The first before variant with r's model and micro-batch (the before tree lacks the newer switches)."""
    return next((b for b in candidates if b.get("model") == r.get("model")
                 and b.get("micro_batch") == r.get("micro_batch")), None)


def main(folder: str) -> int:
    out = Path(folder)
    rows = []
    for part in ("before", "after"):
        for r in _load(out / f"{part}.json") or []:
            rows.append((part, r))
    print(f"{'part':<7} {'variant':<18} {'step ms':>8} {'tok/s':>8} {'MFU':>6} {'busy':>6} {'load min/max':>12} "
          f"{'peak GiB':>8}  profile ms/step: " + " | ".join(k for k, _ in KINDS))
    for part, r in rows:
        if "step_ms" not in r:
            print(f"{part:<7} {r['variant']:<18} {r.get('error', '')[:90]}")
            continue
        lo, hi = r.get("expert_load_min"), r.get("expert_load_max")
        load = f"{lo:.2f}/{hi:.2f}" if lo is not None else "n/a"
        cats = r.get("categories_ms_per_step", {})
        prof = " | ".join(f"{cats.get(c, 0.0):.0f}" for _, c in KINDS)
        print(f"{part:<7} {r['variant']:<18} {r['step_ms']:8.0f} {r['tokens_per_s']:8,.0f} {_pct(r.get('mfu'))} "
              f"{_pct(r.get('busy_share'))} {load:>12} {r['peak_mem_gib']:8.1f}  {prof}")
    mc = _load(out / "mcore.json")
    for v in (mc or {}).get("summary", []):
        tps = v.get("tokens_per_s")
        print(f"{'mcore':<7} {'mb' + str(v.get('micro_batch')):<18} {v.get('median_step_ms') or 0:8.0f} "
              f"{tps or 0:8,.0f} {_pct(v.get('mfu'))} {'':>6} {'':>12} {v.get('peak_mem_gib') or 0:8.1f}  "
              f"status {v.get('status')} recompute {v.get('recompute')}")
    # ratios of the same variant name: after / before, after / megatron-core (by micro-batch)
    after = {r["variant"]: r for p, r in rows if p == "after" and "step_ms" in r}
    before = {r["variant"]: r for p, r in rows if p == "before" and "step_ms" in r}
    mcore = {v.get("micro_batch"): v for v in (mc or {}).get("summary", []) if v.get("tokens_per_s")}
    print("\nratios (tok/s): variant  after/before (before variant)  after/megatron-core")
    for name, r in after.items():
        b = before.get(name) or _same_shape(before.values(), r)  # e.g. after mock-mb1-graphs vs before mock-mb1
        m = mcore.get(r.get("micro_batch")) if r.get("model", "ep4-share") == "ep4-share" else None
        rb = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "n/a"
        rm = f"{r['tokens_per_s'] / m['tokens_per_s']:.2f}x" if m else "n/a"
        print(f"  {name:<18} {rb:>8} ({b['variant'] if b else '-'}) {rm:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
