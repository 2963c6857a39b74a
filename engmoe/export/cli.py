"""``engmoe export-hf``, ``engmoe import-hf`` and ``engmoe soup`` (registered into the ``engmoe`` command by engmoe/cli.py)."""
from __future__ import annotations

import argparse


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``123`` (bytes) → bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or a byte count, got {text!r}") from None


def _export(args) -> int:
    from engmoe.export.hf_export import export_hf

    r = export_hf(args.checkpoint, args.out, dtype=args.dtype, arch=args.arch, tokenizer=args.tokenizer,
                  max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                  with_tokenizer=not args.no_tokenizer)
    print(f"exported {r.checkpoint} → {r.out} as {r.arch} ({args.dtype}, {r.total_bytes / 1e9:.3f} GB in "
          f"{len(r.weight_files)} file(s); tokenizer {r.tokenizer or 'none'})")
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(r.out)!r})")
    return 0


def _import(args) -> int:
    from engmoe.export.hf_import import import_hf

    r = import_hf(args.model, args.out, overwrite=args.overwrite)
    print(f"imported {args.model} ({r.arch}) → {r.checkpoint}; continue from it with "
          f"--set stage.init_from={r.run_dir}")
    return 0


def _soup(args) -> int:
    from engmoe.checkpoint.soup import soup

    ckpt = soup(args.checkpoints, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"souped {len(args.checkpoints)} checkpoints → {ckpt}; start a stage from it with "
          f"--set stage.init_from={args.out}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export-hf", help="write a checkpoint (any parallel layout) as a Hugging Face model directory")
    e.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or an iter_* directory")
    e.add_argument("--out", required=True, help="output directory (created; must not exist unless --overwrite)")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    e.add_argument("--arch", choices=["auto", "qwen2_moe", "mixtral"], default="auto",
                   help="auto: mixtral when model.moe.normalize_topk, else qwen2_moe")
    e.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the checkpoint config's data.tokenizer "
                   "or the demo corpus tokenizer)")
    e.add_argument("--no-tokenizer", action="store_true", help="export weights and config only")
    e.add_argument("--max-shard-size", type=_size, default=5 * 1024**3, help="e.g. 5GB (default), 500MB")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=_export)
    i = sub.add_parser("import-hf", help="turn a Hugging Face model directory into an engmoe checkpoint (iteration 0)")
    i.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    i.add_argument("--out", required=True, help="run directory to create; use it as stage.init_from")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(fn=_import)
    s = sub.add_parser("soup", help="average checkpoints of one model (any parallel layouts) into a new checkpoint")
    s.add_argument("--checkpoints", nargs="+", required=True, help="run directories (their latest) or iter_* dirs")
    s.add_argument("--weights", nargs="+", type=float, default=None, help="one per checkpoint (normalised); "
                   "default uniform")
    s.add_argument("--out", required=True, help="run directory to create (weights only, iteration 0)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_soup)
