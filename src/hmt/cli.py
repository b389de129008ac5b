"""The ``hmt`` command: one sub-command per verb, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from .train import fields_help, run_recipe

    if args.help_fields:
        print(fields_help())
        return 0
    if not args.config:
        print("hmt train: --config recipe.yaml is required (see recipes/)", file=sys.stderr)
        return 2
    results = run_recipe(args.config, stages=args.stage, overrides=args.set, resume=not args.no_resume)
    for result in results:
        summary = f"steps={result.steps}"
        if result.eval:
            summary += f" val_ppl={result.eval['ppl']:.3f} ({result.eval['tokens']} tokens)"
        print(f"[hmt] {'interrupted' if result.interrupted else 'done'}: {summary} -> {result.final_dir or 'checkpoint saved'}")
        if result.interrupted:
            return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmt", description="Hierarchical Memory Transformer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="Train HMT from a YAML recipe (runs under `accelerate launch` too).")
    train.add_argument("--config", help="YAML recipe (see recipes/).")
    train.add_argument("--stage", action="append", help="Run only this stage (repeatable).")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="Override a field for every stage, e.g. --set steps=10 --set hmt.segment_length=128.")
    train.add_argument("--no-resume", action="store_true", help="Ignore an existing checkpoint in output_dir.")
    train.add_argument("--help-fields", action="store_true", help="List the recipe fields and exit.")
    train.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
