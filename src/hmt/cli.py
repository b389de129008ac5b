"""The ``hmt`` command: one sub-command per verb, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import backbone as bb
from . import data as hdata
from . import evaluate as ev
from .arguments import Parser, non_negative_int, positive_int
from .config import HMTConfig
from .constants import DEFAULT_ADAPTER
from .memory import MemoryState
from .model import HMT
from .train import fields_help, run_recipe
from .training.recipe import say
from .utils import chmod_as_created, quiet_libraries, spread


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


def _readable_file(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable (permission denied)")
    return text


def _check_device(spec) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if spec is None:
        return
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {spec}: not a device name ({err}); use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {spec}: this machine has no CUDA GPU usable by torch; use --device cpu.")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1}).")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {spec}: MPS is not available on this machine; use --device cpu.")


def _check_memory_file(path) -> None:
    """A memory file must be loadable (if it exists) and writable where it is to be saved."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--memory-file {path} is a directory; give a file name such as {target / 'memory.safetensors'}.")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--memory-file {path}: the folder {folder} does not exist; create it first (mkdir -p {folder}).")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--memory-file {path}: cannot write there (permission denied); choose another path.")
    # Permission bits do not tell everything (root, read-only mounts, a folder in the way of the
    # temporary file the save goes through): write a probe file there, as the save will.
    if Path(f"{path}.tmp").is_dir():
        raise UsageError(f"--memory-file {path}: {path}.tmp is a folder, and saving writes that file first; "
                         "move it or choose another path.")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"--memory-file {path}: cannot write in {folder} ({err.strerror or err}); choose another path.") from None


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; give a folder name (results.json and segment_ppl.png go in it).")
    if (out / "results.json").exists() and not overwrite:
        raise UsageError(f"{out / 'results.json'} exists from an earlier run; pass --out NEW_FOLDER, or --overwrite to replace it.")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out}: cannot write in {probe} (permission denied); choose another folder.")


def _train(args: argparse.Namespace) -> int:
    if args.help_fields:
        print(fields_help())
        return 0
    if not args.config:
        raise UsageError("--config recipe.yaml is required (see recipes/, or --help-fields for every field).")
    results = run_recipe(args.config, stages=args.stage, overrides=args.set, resume=not args.no_resume)
    for result in results:
        summary = f"steps={result.steps}"
        if result.eval:
            summary += f" val_ppl={result.eval['ppl']:.3f} ({result.eval['tokens']} tokens)"
        say(f"[hmt] {'interrupted' if result.interrupted else 'done'}: {summary} -> {result.final_dir or 'checkpoint saved'}")
        if result.interrupted:
            return 130
    return 0


def _load_model(args: argparse.Namespace):
    """Backbone + HMT (from a checkpoint when given) + tokenizer, and the memory file's state."""
    checkpoint = args.checkpoint
    if checkpoint is None and bb.is_default(args.backbone) and args.segment_length is None:
        checkpoint = DEFAULT_ADAPTER
        print(f"[hmt] using the shipped adapter {DEFAULT_ADAPTER} on the default backbone "
              "(--checkpoint none for an untrained HMT)", file=sys.stderr)
    if isinstance(checkpoint, str) and checkpoint.lower() == "none":
        checkpoint = None
    backbone, tokenizer = bb.load_backbone(args.backbone, device=_device(args))
    if checkpoint:
        model = HMT.from_pretrained(backbone, checkpoint)
    else:
        length = args.segment_length or 256
        with torch.random.fork_rng(devices=[]):  # the same untrained HMT every run: its memory files reload
            torch.manual_seed(0)
            model = HMT(backbone, HMTConfig(segment_length=length, sensory_memory_size=min(32, length)))
    model.eval()
    if args.memory_file and Path(args.memory_file).exists():
        # refused, naming the file, when corrupt or written by another configuration, backbone or adapter
        model.memory_state = MemoryState.load(args.memory_file)
        stats = model.get_memory_stats()
        print(f"[hmt] memory from {args.memory_file}: {stats['segments_processed']} segments read, "
              f"{stats['cache_size']} memories, {stats['pending_tokens']} tokens in the open segment", file=sys.stderr)
    return model, tokenizer


def _check_model_arguments(args: argparse.Namespace) -> None:
    """What can be checked before a model is loaded (generate, chat)."""
    _check_device(args.device)
    _check_memory_file(args.memory_file)


def _generation_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kwargs


def _save_memory(model, args) -> int:
    """Save the memory to ``--memory-file``; if that fails (checked before, but a disk fills, a
    folder goes), to a fallback file, saying where. Returns the exit status: 1 after a fallback."""
    if not args.memory_file or model.memory_state is None:
        return 0
    state = model.memory_state
    target = Path(args.memory_file)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fallbacks = [Path.cwd() / f"hmt-memory-{stamp}.safetensors",
                 Path(tempfile.gettempdir()) / f"hmt-memory-{stamp}-{os.getpid()}.safetensors"]
    for path in [target, *fallbacks]:
        try:
            state.save(path)
        except OSError as err:
            print(f"[hmt] could not save the memory to {path}: {err.strerror or err}", file=sys.stderr)
            continue
        chmod_as_created(path)  # safetensors writes 0600; a memory file is an ordinary file
        if path == target:
            print(f"[hmt] memory saved to {path}", file=sys.stderr)
            return 0
        print(f"[hmt] memory saved to {path} instead of {target}: move it there (mv {path} {target}) to use it "
              f"with --memory-file {target}", file=sys.stderr)
        return 1
    print("[hmt] the memory of this session could not be saved anywhere.", file=sys.stderr)
    return 1


def _generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    _check_model_arguments(args)
    if args.prompt is not None and args.file:
        raise UsageError("give --prompt or --file, not both.")
    if args.prompt is not None:
        text = args.prompt
    elif args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise UsageError(f"--file {args.file} is not UTF-8 text.") from None
    else:
        text = sys.stdin.read()
    if not text:
        raise UsageError("empty prompt (give --prompt, --file or text on stdin).")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args)
    ids = tokenizer(text, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    model.generate(ids, streamer=streamer, **_generation_kwargs(args, tokenizer))
    return _save_memory(model, args)


def _chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    _check_model_arguments(args)
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
        status = _save_memory(model, args)
    return status


def _eval(args: argparse.Namespace) -> int:
    # everything that can be wrong with the arguments, before a model is loaded or a token scored
    _check_device(args.device)
    protocols = ev.parse_protocols(args.protocols, flag="--protocols")
    out = Path(args.out)
    _check_output_dir(out, args.overwrite)
    split = args.split
    if split is None:  # paths: exactly what was given; the named corpora: their held-out test split
        named = [d for d in args.data if hdata.named_source(d)]
        split = "test" if named and len(named) == len(args.data) else "all"

    def fresh_backbone():
        return bb.load_backbone(args.backbone, device=_device(args))

    backbone, tokenizer = fresh_backbone()
    source = args.data[0] if len(args.data) == 1 else list(args.data)
    corpus = hdata.TokenizedCorpus.from_source(source, tokenizer, progress=True)
    found = f"{corpus.num_documents} document(s), {corpus.num_tokens} tokens in {' '.join(args.data)}"
    if split == "all":
        candidates = [(corpus.names[i], corpus.document(i)) for i in range(corpus.num_documents)]
    else:
        parts = hdata.split_documents(corpus, split, args.split_fractions)
        if parts.within_documents:
            print(f"[hmt] {found}: too few documents for a document-level split; scoring the {split} part "
                  "of each document (token ranges)", file=sys.stderr)
        candidates = [(parts.names[i], parts.document(i)) for i in range(parts.num_documents)]
    long_enough = [c for c in candidates if len(c[1]) >= args.min_tokens]
    if not long_enough:
        longest = max((len(ids) for _, ids in candidates), default=0)
        raise UsageError(
            f"no {'' if split == 'all' else split + ' '}document has --min-tokens {args.min_tokens} tokens ({found}; "
            f"{len(candidates)} in the {split} split, the longest {longest} tokens): lower --min-tokens"
            + (", or pass --split all to score every document." if split != "all" else ".")
        )
    chosen = spread(long_enough, args.documents)
    documents = [(name, torch.as_tensor(ids[: args.max_tokens])) for name, ids in chosen]

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
    weights = {p: baseline_label for p in protocols if p in ("disjoint", "sensory") or p.startswith("sliding-")}
    weights.update({"hmt": hmt_label, "hmt-causal": f"{hmt_label}, scored causally", "recurrence": recurrence_label})
    print(f"[hmt] split {split}: {len(documents)} documents, {sum(len(d) for _, d in documents)} tokens: "
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
    out.mkdir(parents=True, exist_ok=True)
    ev.save_results(results, out / "results.json", {"data": args.data, "split": split,
                                                    "documents": [n for n, _ in documents]})
    ev.plot_segment_ppl(results, out / "segment_ppl.png", hmt_model.config.segment_length)
    print(f"[hmt] wrote {out / 'results.json'} and {out / 'segment_ppl.png'}", file=sys.stderr)
    return 0


def _device(args: argparse.Namespace) -> str:
    """``--device``, else the first GPU when there is one, else the CPU."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU when there is one).")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=None, help="HF id or directory (default: SmolLM2-135M).")
    _add_device_argument(parser)
    parser.add_argument("--checkpoint", default=None,
                        help=f"HMT checkpoint directory (save_pretrained) or shipped adapter name; 'none' for an "
                             f"untrained HMT (default on the default backbone: the shipped adapter {DEFAULT_ADAPTER}).")
    parser.add_argument("--segment-length", type=positive_int, default=None,
                        help="L of an untrained HMT (default 256; giving it without --checkpoint means an untrained HMT).")
    parser.add_argument("--memory-file", default=None, help="Load the memory from / save it to this file.")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hmt", description="Hierarchical Memory Transformer tools.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
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
    generate.add_argument("--file", default=None, type=_readable_file)
    _add_model_arguments(generate)
    generate.set_defaults(func=_generate)

    evaluate = sub.add_parser("eval", help="Perplexity over long documents: HMT against baselines.")
    evaluate.add_argument("--data", nargs="+", default=["kjv"],
                          help="Source(s) for hmt.data (path, glob, JSONL, kjv, python-docs, ...); several mix.")
    evaluate.add_argument("--split", default=None, choices=["train", "validation", "test", "all"],
                          help="Score one split (a source with too few documents is split inside its documents by "
                               "token ranges). Default: every document given; the named corpora (kjv, python-docs, "
                               "python-stdlib, hf:...) their test split.")
    evaluate.add_argument("--split-fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1])
    evaluate.add_argument("--documents", type=positive_int, default=4, help="How many documents (spread over the split).")
    evaluate.add_argument("--min-tokens", type=non_negative_int, default=8192)
    evaluate.add_argument("--max-tokens", type=positive_int, default=8192, help="Score the first this many tokens of each.")
    evaluate.add_argument("--protocols", default=",".join(ev.DEFAULT_PROTOCOLS),
                          help="Comma-separated: disjoint, sensory, sliding-W, sliding-max, recurrence, hmt, and "
                               "hmt-causal (HMT scored strictly causally; ~j extra passes per segment).")
    evaluate.add_argument("--backbone", default=None)
    _add_device_argument(evaluate)
    evaluate.add_argument("--hmt", default=None, help="HMT checkpoint (default: untrained HMT).")
    evaluate.add_argument("--stage1", default=None, help="Stage-1 checkpoint for the recurrence protocol.")
    evaluate.add_argument("--baseline", default=None, help="Checkpoint of the backbone fine-tuned without memory.")
    evaluate.add_argument("--segment-length", type=positive_int, default=256)
    evaluate.add_argument("--sensory", type=non_negative_int, default=32)
    evaluate.add_argument("--sliding-stride", type=positive_int, default=None,
                          help="New tokens per sliding-window step (default L); context is W - stride.")
    evaluate.add_argument("--out", default="outputs/eval", help="Folder for results.json and segment_ppl.png.")
    evaluate.add_argument("--overwrite", action="store_true", help="Replace the results of an earlier run in --out.")
    evaluate.set_defaults(func=_eval)

    chat = sub.add_parser("chat", help="Chat with memory; --memory-file remembers earlier conversations.")
    _add_model_arguments(chat)
    chat.set_defaults(func=_chat)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text += f": {err.filename}"
    return text


def main(argv=None) -> int:
    """The ``hmt`` command. A user error is one line on stderr and exit status 2 (``--debug``: the
    traceback); Ctrl-C is one line and 130; anything else is a bug and shows its traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad argument (already printed as one line)
        return exit_.code if isinstance(exit_.code, int) else 2
    quiet_libraries()
    verb = f"hmt {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{verb}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError, ImportError) as err:
        if getattr(args, "debug", False):
            raise
        hint = "" if isinstance(err, UsageError) else " (--debug shows the traceback)"
        print(f"{verb}: error: {_one_line(err)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
