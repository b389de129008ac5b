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


def _load_model(args: argparse.Namespace):
    """Backbone + HMT (from a checkpoint when given) + tokenizer, and the memory file's state."""
    from pathlib import Path

    from .backbone import load_backbone
    from .config import HMTConfig
    from .memory import MemoryState
    from .model import HMT

    backbone, tokenizer = load_backbone(args.backbone)
    if args.checkpoint:
        model = HMT.from_pretrained(backbone, args.checkpoint)
    else:
        model = HMT(backbone, HMTConfig(segment_length=args.segment_length, sensory_memory_size=min(32, args.segment_length)))
    model.eval()
    if args.memory_file and Path(args.memory_file).exists():
        model.memory_state = MemoryState.load(args.memory_file)
        stats = model.get_memory_stats()
        print(f"[hmt] memory from {args.memory_file}: {stats['segments_processed']} segments read, "
              f"{stats['cache_size']} memories", file=sys.stderr)
    return model, tokenizer


def _generation_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kwargs


def _save_memory(model, args) -> None:
    if args.memory_file and model.memory_state is not None:
        model.memory_state.save(args.memory_file)
        print(f"[hmt] memory saved to {args.memory_file}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    if args.prompt is not None:
        text = args.prompt
    elif args.file:
        with open(args.file) as f:
            text = f.read()
    else:
        text = sys.stdin.read()
    if not text:
        print("hmt generate: empty prompt (give --prompt, --file or text on stdin)", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args)
    ids = tokenizer(text, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    model.generate(ids, streamer=streamer, **_generation_kwargs(args, tokenizer))
    _save_memory(model, args)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    model, tokenizer = _load_model(args)
    print("[hmt] chat: one message per line; an empty line or Ctrl-D ends. The memory keeps every turn.", file=sys.stderr)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages = [{"role": "user", "content": line}]
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            else:
                ids = tokenizer(f"User: {line}\nAssistant:", return_tensors="pt").input_ids
            print("hmt> ", end="", flush=True)
            model.generate(ids, streamer=streamer, **_generation_kwargs(args, tokenizer))
    finally:
        _save_memory(model, args)
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=None, help="HF id or directory (default: SmolLM2-135M).")
    parser.add_argument("--checkpoint", default=None, help="HMT checkpoint directory (save_pretrained).")
    parser.add_argument("--segment-length", type=int, default=256, help="L when no checkpoint is given.")
    parser.add_argument("--memory-file", default=None, help="Load the memory from / save it to this file.")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)


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

    generate = sub.add_parser("generate", help="Generate from a prompt (argument, file or stdin), streamed.")
    generate.add_argument("--prompt", default=None)
    generate.add_argument("--file", default=None)
    _add_model_arguments(generate)
    generate.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="Chat with memory; --memory-file remembers earlier conversations.")
    _add_model_arguments(chat)
    chat.set_defaults(func=_chat)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
