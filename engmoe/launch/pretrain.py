"""engmoe pretraining entry point (run under torchrun, from an install or a checkout).

    torchrun --nproc-per-node 8 -m engmoe.launch.pretrain --stage 2 [--model enggpt2-16b-a3b] \
        [--config extra.yaml] [--set optimizer.lr=2e-4 ...] [--resume auto]

Stages are the packaged ``engmoe/resources/stages/<stage>.yaml`` (1, 2, 3, long-context, mid-training) or a
stage YAML path. On a machine without the stage's data (its ``data.data_root`` does not exist) and no data
settings given, it runs the built-in demo: the ``tiny`` model on the demo corpus, with the stage scaled down
by ``engmoe/resources/demo/<stage>.yaml``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engmoe import resources
from engmoe.config import Config, ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engmoe.launch.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help="1 | 2 | 3 | long-context | mid-training | path/to/stage.yaml")
    p.add_argument("--model", default=None, help="model preset (enggpt2-16b-a3b | proxy | tiny) or a YAML path")
    p.add_argument("--config", action="append", default=[], help="extra YAML overlaid on the stage (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint in stage.save_dir) or a path")
    p.add_argument("--demo", action="store_true", help="force the built-in demo (tiny model, demo corpus)")
    p.add_argument("--exit-after", type=int, default=None, help="save and exit after this many steps (testing, "
                   "time-limited jobs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of a configuration, data or "
                   "checkpoint error (default: one 'engmoe: error: ...' line, exit status 2; or ENGMOE_TRACEBACK=1)")
    return p.parse_args(argv)


def wants_demo(cfg: Config, args) -> bool:
    """Demo mode: the stage's data is not on this machine and the user gave no data settings."""
    user_data = any(s.startswith("data.") for s in args.set) or bool(args.config)
    if user_data:
        return False
    if cfg.data.mock:
        return False
    root = cfg.data.data_root
    return root is None or not Path(root).exists()


def demo_overlay(stage: str) -> resources.Resource:
    """The packaged demo overlay of a stage (by the stage file's name: ``1``, ``mid-training``, ...)."""
    return resources.find("demo", stage, ConfigError)


def main(argv=None) -> int:
    from engmoe.config import load_config, stage_path

    args = parse_args(argv)
    cfg = load_config(model=args.model, stage=args.stage, files=args.config, overrides=args.set)
    demo = args.demo or wants_demo(cfg, args)
    if demo:
        overlay = demo_overlay(stage_path(args.stage).name.rsplit(".", 1)[0])
        cfg = load_config(model=args.model or "tiny", stage=args.stage, files=[overlay, *args.config],
                          overrides=args.set)
        print(f"engmoe: no data for stage {args.stage} on this machine ({cfg.data.data_root or 'data.data_root unset'}); "
              f"running the built-in demo: model {cfg.model.name}, demo corpus, {overlay}", flush=True)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if demo:
        from engmoe.launch.demo import use_demo_corpus

        print(f"engmoe: demo data: {use_demo_corpus(cfg)}", flush=True)
    from engmoe.training.trainer import Trainer

    Trainer(cfg, resume=args.resume, exit_after=args.exit_after).train()
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from engmoe.errors import run_cli

    sys.exit(run_cli(main, prog="engmoe"))
