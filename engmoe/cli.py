"""``engmoe`` command: small utilities around the model (training is ``python -m engmoe.launch.pretrain``)."""
from __future__ import annotations

import argparse
import sys
import time


def _params(args) -> int:
    from engmoe.config import load_config
    from engmoe.model import count_parameters

    for preset in args.presets:
        cfg = load_config(model=preset)
        print(f"{preset:>18}: {count_parameters(cfg.model).summary()}")
    return 0


def _smoke(args) -> int:
    """Build a preset on this machine and take a few optimizer steps on one fixed random batch."""
    import torch

    from engmoe.config import load_config
    from engmoe.model import build_model, count_parameters
    from engmoe.parallel import initialize_parallel

    cfg = load_config(model=args.model, overrides=args.set)
    env = initialize_parallel(cfg.parallel)
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    model = build_model(cfg.model, cfg.parallel, seed=cfg.stage.seed, device=env.device, params_dtype=dtype,
                        env=env)
    print(f"model {cfg.model.name}: {count_parameters(cfg.model).summary()} on {env.device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g).to(env.device)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        out = model(x[:, :-1], labels=x[:, 1:])
        loss = out.loss.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            aux = model.moe_stats().aux_loss.sum().item()
            print(f"step {step:4d} | loss {loss.item():.4f} | aux {aux:.4f} | {time.time() - t0:.1f}s")
    return 0


def _slurm(args) -> int:

    from engmoe import slurm

    extra = {"partition": args.partition, "time": args.time, "workdir": args.workdir, "env_setup": args.env_setup,
             "extra_args": " ".join(args.extra)}
    if args.job == "pretrain":
        text = slurm.render("pretrain.sbatch", slurm.pretrain_values(args.stage, args.nodes, args.gpus_per_node,
                                                                     signal_lead=args.signal_lead, **extra))
    else:
        text = slurm.render("tokenize.sbatch", slurm.tokenize_values(**extra))
    if args.out:
        from engmoe.io import write_text_atomic

        write_text_atomic(args.out, text)
        print(f"wrote {args.out}: submit with `sbatch {args.out}`")
    else:
        print(text)
    return 0


def _register_extensions(sub) -> None:
    """Subcommands that live with their packages (each module's ``register(subparsers)``)."""
    from engmoe.eval.cli import register as register_eval
    from engmoe.export.cli import register as register_export
    from engmoe.report.cli import register as register_report

    for register in (register_export, register_eval, register_report):
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engmoe", description=__doc__)
    parser.add_argument("--traceback", action="store_true", help="full traceback on errors (default: one line; "
                        "or ENGMOE_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="print total/active parameter counts of model presets")
    p.add_argument("presets", nargs="*", default=["enggpt2-16b-a3b", "proxy", "tiny"])
    p.set_defaults(fn=_params)
    s = sub.add_parser("smoke", help="a few training steps of a preset on one fixed random batch")
    s.add_argument("--model", default="tiny")
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq", type=int, default=128)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=_smoke)
    j = sub.add_parser("slurm", help="render an sbatch script (pretrain per stage, or tokenize); "
                       "arguments after -- are passed to the job")
    j.add_argument("job", choices=["pretrain", "tokenize"])
    j.add_argument("--stage", default="1")
    j.add_argument("--nodes", type=int, default=None, help="default: the report's count for the stage")
    j.add_argument("--gpus-per-node", type=int, default=4)
    j.add_argument("--partition", default=None)
    j.add_argument("--time", default=None)
    j.add_argument("--workdir", default=None)
    j.add_argument("--env-setup", default=None, help="shell line run before training (module load, venv)")
    j.add_argument("--signal-lead", type=int, default=None, help="pretrain: SIGTERM this many seconds before the "
                   "time limit (default 300); torchrun's shutdown timeout is derived from it (minus 30 s)")
    j.add_argument("--out", default=None)
    j.set_defaults(fn=_slurm)
    _register_extensions(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # everything after -- goes to the job
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    return args.fn(args)


def run(argv: list[str] | None = None) -> int:
    """The console entry point: user errors as one line (engmoe/errors.py)."""
    from engmoe.errors import run_cli

    return run_cli(main, argv, prog="engmoe")


if __name__ == "__main__":
    sys.exit(run())
