"""The ``hmt`` command: one sub-command per verb, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

DEFAULT_PROTOCOLS_TEXT = ("disjoint", "sensory", "sliding-2048", "recurrence", "hmt")


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

    backbone, tokenizer = load_backbone(args.backbone, device=_device(args))
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


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import data as hdata
    from . import evaluate as ev
    from .backbone import load_backbone
    from .config import HMTConfig
    from .model import HMT

    def fresh_backbone():
        return load_backbone(args.backbone, device=_device(args))

    backbone, tokenizer = fresh_backbone()
    if args.hmt:
        hmt_model = HMT.from_pretrained(backbone, args.hmt).eval()
        hmt_label = f"HMT checkpoint {args.hmt}"
    else:
        hmt_model = HMT(backbone, HMTConfig(segment_length=args.segment_length, sensory_memory_size=args.sensory)).eval()
        hmt_label = "untrained HMT on the base backbone"
    recurrence = None
    recurrence_label = f"{hmt_label}, retrieval off"
    if args.stage1:
        recurrence = HMT.from_pretrained(fresh_backbone()[0], args.stage1, use_retrieval=False).eval()
        recurrence_label = f"stage-1 checkpoint {args.stage1}"
    baseline = None
    baseline_label = "base backbone weights" if not args.hmt else "backbone weights of the HMT checkpoint"
    if args.baseline:
        baseline = HMT.from_pretrained(fresh_backbone()[0], args.baseline).backbone.eval()
        baseline_label = f"baseline checkpoint {args.baseline} (fine-tuned without memory)"
    source = args.data[0] if len(args.data) == 1 else list(args.data)
    corpus = hdata.TokenizedCorpus.from_source(source, tokenizer, progress=True)
    indices = corpus.split(args.split, args.split_fractions) if args.split != "all" else list(range(corpus.num_documents))
    indices = [i for i in indices if len(corpus.document(i)) >= args.min_tokens]
    if not indices:
        print(f"hmt eval: no {args.split} document of {args.data} has {args.min_tokens} tokens", file=sys.stderr)
        return 2
    count = min(args.documents, len(indices))
    chosen = [indices[i * len(indices) // count] for i in range(count)]
    import torch

    documents = [(corpus.names[i], torch.as_tensor(corpus.document(i)[: args.max_tokens])) for i in chosen]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    weights = {p: baseline_label for p in protocols if p in ("disjoint", "sensory") or p.startswith("sliding-")}
    weights.update({"hmt": hmt_label, "hmt-causal": f"{hmt_label}, scored causally", "recurrence": recurrence_label})
    print(f"[hmt] {len(documents)} documents, {sum(len(d) for _, d in documents)} tokens: "
          + ", ".join(name for name, _ in documents), file=sys.stderr)
    results = ev.evaluate(documents, hmt_model=hmt_model, recurrence_model=recurrence, baseline_backbone=baseline,
                          protocols=protocols, weights=weights, sliding_stride=args.sliding_stride)
    print(ev.format_table(results))
    if "sensory" in results and "hmt" in results and any(p.startswith("sliding-") for p in results):
        sliding = next(results[p] for p in results if p.startswith("sliding-"))
        gap = results["sensory"].ppl - sliding.ppl
        if gap > 0:
            print(f"HMT closes {100 * (results['sensory'].ppl - results['hmt'].ppl) / gap:.1f}% of the gap from "
                  f"sensory ({results['sensory'].ppl:.3f}) to {sliding.protocol} ({sliding.ppl:.3f}).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev.save_results(results, out / "results.json", {"data": args.data, "split": args.split,
                                                    "documents": [n for n, _ in documents]})
    ev.plot_segment_ppl(results, out / "segment_ppl.png", hmt_model.config.segment_length)
    print(f"[hmt] wrote {out / 'results.json'} and {out / 'segment_ppl.png'}", file=sys.stderr)
    return 0


def _device(args: argparse.Namespace) -> str:
    """``--device``, else the first GPU when there is one, else the CPU."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU when there is one).")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=None, help="HF id or directory (default: SmolLM2-135M).")
    _add_device_argument(parser)
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

    evaluate = sub.add_parser("eval", help="Perplexity over long documents: HMT against baselines.")
    evaluate.add_argument("--data", nargs="+", default=["kjv"],
                          help="Source(s) for hmt.data (path, glob, JSONL, kjv, python-docs, ...); several mix.")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    evaluate.add_argument("--split-fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1])
    evaluate.add_argument("--documents", type=int, default=4, help="How many documents (spread over the split).")
    evaluate.add_argument("--min-tokens", type=int, default=8192)
    evaluate.add_argument("--max-tokens", type=int, default=8192, help="Score the first this many tokens of each.")
    evaluate.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS_TEXT),
                          help="Comma-separated: disjoint, sensory, sliding-W, sliding-max, recurrence, hmt, and "
                               "hmt-causal (HMT scored strictly causally; ~j extra passes per segment).")
    evaluate.add_argument("--backbone", default=None)
    _add_device_argument(evaluate)
    evaluate.add_argument("--hmt", default=None, help="HMT checkpoint (default: untrained HMT).")
    evaluate.add_argument("--stage1", default=None, help="Stage-1 checkpoint for the recurrence protocol.")
    evaluate.add_argument("--baseline", default=None, help="Checkpoint of the backbone fine-tuned without memory.")
    evaluate.add_argument("--segment-length", type=int, default=256)
    evaluate.add_argument("--sensory", type=int, default=32)
    evaluate.add_argument("--sliding-stride", type=int, default=None,
                          help="New tokens per sliding-window step (default L); context is W - stride.")
    evaluate.add_argument("--out", default="outputs/eval")
    evaluate.set_defaults(func=_eval)

    chat = sub.add_parser("chat", help="Chat with memory; --memory-file remembers earlier conversations.")
    _add_model_arguments(chat)
    chat.set_defaults(func=_chat)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
