"""``engmoe-data``: the data engineer's commands.

    engmoe-data build-tokenizer --out data/tokenizer/enggpt2.json          # Tekken v3 + our 12 specials
    engmoe-data train-tokenizer --input corpus.jsonl --vocab-size 32768 --out tok.json
    engmoe-data tokenize --input raw/fineweb-edu --output data/tokenized/fineweb-edu-en \
        --tokenizer data/tokenizer/enggpt2.json --tasks 64 --workers 8 [--copyright-filter 0.4] [--slurm ...]
    engmoe-data check-blend stage1 --data-root data/tokenized --tokens 600e9
    engmoe-data render-chat --input chats.jsonl --tokenizer tok.json --out data/chat_packed/sft --seq-len 32768
    engmoe-data copyright-score --input docs.jsonl          # per-signal table, drop rate at 0.3 / 0.4
    engmoe-data demo [--root data/demo]                     # the built-in demo corpus (offline)
"""
from __future__ import annotations

import argparse
import sys


def _tokenize(args) -> int:
    from engmoe.data_prep.tokenize import TokenizeJob, run_job

    slurm = None
    if args.slurm:
        slurm = {"partition": args.partition, "time": args.time, "cpus_per_task": args.cpus_per_task,
                 "mem_per_cpu_gb": args.mem_per_cpu_gb, "qos": args.qos, "env_command": args.env_command,
                 "venv_path": args.venv_path}
    job = TokenizeJob(input=args.input, output=args.output, tokenizer=args.tokenizer, name=args.name,
                      format=args.format, glob=args.glob, text_key=args.text_key, tasks=args.tasks,
                      workers=args.workers, add_bos=args.bos, on_error=args.on_error,
                      copyright_threshold=args.copyright_filter, copyright_blocklist=args.copyright_blocklist,
                      write_exclusions=not args.no_exclusions, source=args.source, license=args.license,
                      logging_dir=args.logging_dir, progress=not args.no_progress, slurm=slurm)
    manifest = run_job(job)
    if manifest is None:
        print(f"submitted SLURM jobs for {args.output}; the manifest appears at {args.output}/manifest.json when done")
    else:
        print(f"{manifest['name']}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
              f"{len(manifest['shards'])} shard(s) → {args.output}/manifest.json")
        skipped = {f"skipped {k}": v for k, v in manifest.get("skipped", {}).items() if v}
        for step, stats in manifest.get("pipeline_stats", {}).items():
            for k, v in stats.items():
                if k in ("dropped", "forwarded"):
                    skipped[f"{step}: {k}"] = v
        for k, v in skipped.items():
            print(f"  {k}: {v:,.0f}")
    return 0


def _check_blend(args) -> int:
    from engmoe.data.blend import check_report, load_blend, resolve_blend

    blend = load_blend(args.blend)
    resolved = resolve_blend(blend, args.data_root, strict=False)
    print(check_report(blend, resolved, args.tokens))
    return 1 if resolved.missing else 0


def _demo(args) -> int:
    from engmoe.data_prep.demo import ensure_demo_corpus

    demo = ensure_demo_corpus(args.root, rebuild=args.rebuild)
    print(demo.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engmoe-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="full traceback on errors (default: one line; "
                        "or ENGMOE_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenize", help="jsonl/parquet → (filters) → megatron .bin/.idx shards + manifest (datatrove)")
    t.add_argument("--input", required=True, help="a file, or a folder searched recursively")
    t.add_argument("--output", required=True, help="output folder for shards and manifest.json")
    t.add_argument("--tokenizer", required=True, help="tokenizer JSON (engmoe-data build-tokenizer)")
    t.add_argument("--name", default=None, help="dataset name in the manifest (default: the output folder name)")
    t.add_argument("--format", choices=["jsonl", "parquet"], default=None, help="default: inferred from the files")
    t.add_argument("--glob", default=None, help="file pattern inside --input (default **/*.jsonl* or **/*.parquet)")
    t.add_argument("--text-key", default="text")
    t.add_argument("--tasks", type=int, default=1, help="datatrove tasks = output shards (input files split r::tasks)")
    t.add_argument("--workers", type=int, default=1, help="tasks run at once (local executor)")
    t.add_argument("--bos", action="store_true", help="prepend <s> to every document (EOS is always appended)")
    t.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad records (invalid JSON, missing text, corrupt file): stop with an error, or skip and count")
    t.add_argument("--copyright-filter", type=float, default=None, metavar="THRESHOLD",
                   help="drop documents whose copyright-risk score exceeds THRESHOLD (0.4 default in the report; 0.3 stricter)")
    t.add_argument("--copyright-blocklist", default=None, help="domain blocklist file (default: the shipped list)")
    t.add_argument("--no-exclusions", action="store_true", help="do not write dropped documents to <output>/excluded/")
    t.add_argument("--source", default=None, help="where the data came from (recorded in the manifest)")
    t.add_argument("--license", default=None, help="the data's licence (recorded in the manifest)")
    t.add_argument("--logging-dir", default=None, help="datatrove logs + completion markers (default <output>/.logs)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--slurm", action="store_true", help="submit with datatrove's SLURM executor instead of running here")
    t.add_argument("--partition", default=None)
    t.add_argument("--time", default="12:00:00")
    t.add_argument("--cpus-per-task", type=int, default=1)
    t.add_argument("--mem-per-cpu-gb", type=float, default=2)
    t.add_argument("--qos", default=None)
    t.add_argument("--env-command", default=None, help="shell line run before each task (module load, venv)")
    t.add_argument("--venv-path", default=None)
    t.set_defaults(fn=_tokenize)

    c = sub.add_parser("check-blend", help="per-dataset tokens, epochs per token budget, missing paths of a blend")
    c.add_argument("blend", help="a packaged blend (stage1, stage2, ...) or a blend YAML path")
    c.add_argument("--data-root", default=None)
    c.add_argument("--tokens", type=float, default=None, help="token budget of the stage, e.g. 600e9")
    c.set_defaults(fn=_check_blend)

    d = sub.add_parser("demo", help="build the built-in demo corpus offline (English Wikipedia extract + Italian)")
    d.add_argument("--root", default="data/demo")
    d.add_argument("--rebuild", action="store_true")
    d.set_defaults(fn=_demo)

    try:
        from engmoe.data_prep import chat_data, tokenizer_build
        from engmoe.data_prep.copyright import cli as copyright_cli
    except ImportError as e:  # the commands need the optional `data` extra (datatrove, tokenizers, ...)
        from engmoe.errors import extra_for, missing_extra

        extra = extra_for(e)
        if extra is None:
            raise
        raise missing_extra(e.name.split(".")[0], extra, "engmoe-data") from e

    for module in (tokenizer_build, copyright_cli, chat_data):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


def run(argv: list[str] | None = None) -> int:
    """The console entry point: user errors as one line (engmoe/errors.py)."""
    from engmoe.errors import run_cli

    return run_cli(main, argv, prog="engmoe-data")


if __name__ == "__main__":
    sys.exit(run())
