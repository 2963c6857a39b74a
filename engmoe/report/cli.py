"""``engmoe report {compute, data, curves}`` (registered into the ``engmoe`` command by engmoe/cli.py)."""
from __future__ import annotations

from engmoe.io import write_text_atomic


def _write(path: str | None, text: str) -> None:
    if path:
        write_text_atomic(path, text)


def _peak(args) -> tuple[float, str]:
    from engmoe.training.metrics import PEAK_BF16_FLOPS

    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s device"
    if args.gpu not in PEAK_BF16_FLOPS:
        raise SystemExit(f"--gpu {args.gpu}: unknown; choose from {sorted(PEAK_BF16_FLOPS)} or give --peak-tflops")
    return PEAK_BF16_FLOPS[args.gpu], args.gpu


def _compute(args) -> int:
    from engmoe.report.compute import collect, to_markdown

    peak, gpu = _peak(args)
    text = to_markdown(collect(args.runs), peak, gpu)
    print(text, end="")
    _write(args.out, text)
    if args.plot:
        from engmoe.report.curves import plot, read_run

        print(f"curves: {plot([read_run(r) for r in args.runs], args.plot)}")
    return 0


def _data(args) -> int:
    from engmoe.report.data import collect_stage, to_markdown

    budgets = list(args.stage_tokens or [])
    if budgets and len(budgets) != len(args.blends):
        raise SystemExit(f"--stage-tokens: give one budget per blend ({len(args.blends)}), got {len(budgets)}")
    stages = [collect_stage(b, args.data_root, budgets[i] if budgets else None) for i, b in enumerate(args.blends)]
    text = to_markdown(stages)
    print(text, end="")
    _write(args.out, text)
    return 0


def _curves(args) -> int:
    from engmoe.report.curves import plot, read_run

    print(plot([read_run(r) for r in args.runs], args.out))
    return 0


def _expert_load(args) -> int:
    from engmoe.report.expert_load import plot

    print(plot(args.runs, args.out))
    return 0


def register(sub) -> None:
    rp = sub.add_parser("report", help="compute (FLOPs, GPU-hours, MFU, EU AI Act), data summary, loss/MFU plot, expert load")
    rsub = rp.add_subparsers(dest="report_command", required=True)
    c = rsub.add_parser("compute", help="training FLOPs per stage and cumulative vs the EU AI Act thresholds")
    c.add_argument("runs", nargs="+", help="stage run directories (save_dir), in pipeline order")
    c.add_argument("--gpu", default="H100", help="peak bf16 FLOP/s for MFU: A100, H100, H200, H800, B200")
    c.add_argument("--peak-tflops", type=float, default=None, help="explicit peak per device instead of --gpu")
    c.add_argument("--out", default=None, help="also write the markdown here")
    c.add_argument("--plot", default=None, help="also write the loss/MFU curves PNG here")
    c.set_defaults(fn=_compute)
    d = rsub.add_parser("data", help="training-data summary from blend manifests")
    d.add_argument("blends", nargs="+", help="blends (packaged names or YAML paths, one per stage), in pipeline order")
    d.add_argument("--data-root", default=None, help="root the blends' manifest paths resolve against")
    d.add_argument("--stage-tokens", type=float, nargs="+", default=None,
                   help="token budget per blend (e.g. 600e9 1.5e12 400e9) for tokens drawn and epochs")
    d.add_argument("--out", default=None, help="also write the markdown here")
    d.set_defaults(fn=_data)
    p = rsub.add_parser("curves", help="loss/MFU curves PNG from the runs' TensorBoard logs")
    p.add_argument("runs", nargs="+", help="stage run directories, in pipeline order")
    p.add_argument("--out", required=True, help="PNG path")
    p.set_defaults(fn=_curves)
    e = rsub.add_parser("expert-load", help="layer × expert load heatmap over the runs from their TensorBoard logs")
    e.add_argument("runs", nargs="+", help="stage run directories, in pipeline order")
    e.add_argument("--out", required=True, help="PNG path")
    e.set_defaults(fn=_expert_load)
