"""Does HMT's long-term memory remember? A key recalled 2 to 64 segments later, on one CPU thread.

Trains tiny Llama backbones from scratch (``hmt.recall.tiny_llama``), each wrapped by ``hmt.HMT``,
on the synthetic recall probe of ``hmt.recall`` (a 4-digit key in segment 0, distractor segments,
a query segment asking for it; loss on the answer only), then measures teacher-forced exact-answer
accuracy at distances never trained on as well as the trained ones. Every variant starts from the
same backbone initialisation, sees the same data stream and trains the same number of steps:

* ``hmt``: retrieval on, plus the reference's supervised retrieval loss (0.05 x);
* ``recurrence``: ``use_retrieval=False`` (P_n = m_{n-1}, the paper's stage-1 model);
* ``sensory``: the plain backbone reading each segment after the last k tokens before it
  (``use_memory="sensory"``): the baseline that has no long-term memory.

``--ablations`` adds HMT variants that each change one thing (see ``ABLATIONS``).

    python benchmarks/memory_recall.py --json benchmarks/results/memory_recall_cpu.json
    python benchmarks/memory_recall.py --quick          # a short version (~2 minutes), the CI test's probe
    python benchmarks/memory_recall.py --variants --ablations all --json benchmarks/results/memory_recall_ablations_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import hmt  # noqa: E402
from hmt import recall  # noqa: E402
from hmt.arguments import (Parser, check_output_file, non_negative_float, non_negative_int, positive_float,  # noqa: E402
                           positive_int, run)

MAIN = ("hmt", "recurrence", "sensory")
# --quick: the setting of tests/test_memory_recall.py (learns in about 30 s per variant)
QUICK = dict(steps=800, batch_size=16, digits=1, hidden=32, heads=2, vocab=32, train_distances=[2, 3],
             eval_examples=200, no_curriculum=True, warmup=20)
# name -> (what it changes, HMTConfig overrides, RecallTrainConfig overrides)
ABLATIONS = {
    "no_retrieval_loss": ("HMT without the supervised retrieval loss (LM loss only)", {},
                          {"retrieval_loss_weight": 0.0}),
    "fixed_distance": ("HMT trained at one fixed distance (the largest trained one), no curriculum", {},
                       {"fixed": True}),
    "hmt_lr_x0.1": ("HMT's own parameters at 0.1 x the backbone's learning rate", {}, {"hmt_lr_scale": 0.1}),
    "hmt_lr_x3": ("HMT's own parameters at 3 x the backbone's learning rate", {}, {"hmt_lr_scale": 3.0}),
    "compression_identity": ("memory_compression='identity'", {"memory_compression": "identity"}, {}),
    "compression_embedding": ("memory_compression='embedding'", {"memory_compression": "embedding"}, {}),
    "detach_every_1": ("truncated BPTT: detach_every=1 (no gradient across segments)", {}, {"detach_every": 1}),
    "detach_every_2": ("truncated BPTT: detach_every=2", {}, {"detach_every": 2}),
    "random_evidence_position": ("HMT trained with the key in a random segment (not always the first)", {},
                                 {"evidence_segment": None}),
}


def run_variant(name: str, args, hmt_overrides: dict, train_overrides: dict) -> dict:
    torch.manual_seed(args.seed)
    task = recall.RecallTask(segment_length=args.segment_length, num_digits=args.digits, vocab_size=args.vocab)
    backbone = recall.tiny_llama(vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers,
                                 heads=args.heads, seed=args.seed)
    cfg = dict(segment_length=args.segment_length, sensory_memory_size=args.sensory,
               num_memory_embeddings=args.cache, memory_compression=args.compression)
    if name == "recurrence":
        cfg["use_retrieval"] = False
    cfg.update(hmt_overrides)
    model = hmt.HMT(backbone, hmt.HMTConfig(**cfg))
    train_overrides = dict(train_overrides)
    hmt_lr_scale = train_overrides.pop("hmt_lr_scale", None)
    fixed = train_overrides.pop("fixed", False)
    train_cfg = recall.RecallTrainConfig(
        steps=args.steps, batch_size=args.batch_size, distances=tuple(args.train_distances),
        curriculum=not args.no_curriculum, lr=args.lr, warmup_steps=args.warmup,
        retrieval_loss_weight=args.retrieval_loss_weight, seed=args.seed,
        use_memory="sensory" if name == "sensory" else True,
    )
    if hmt_lr_scale is not None:
        train_cfg.hmt_lr = args.lr * hmt_lr_scale
    if fixed:
        train_cfg.distances, train_cfg.curriculum = (max(args.train_distances),), False
    train_cfg = dataclasses.replace(train_cfg, **train_overrides)

    def log(record):
        print(f"  [{name}] step {record['step']:5d}  distance {record['distance']:3d}  "
              f"answer loss {record['lm_loss']:.3f}  retrieval loss "
              f"{'-' if record['retrieval_loss'] is None else format(record['retrieval_loss'], '.3f')}  "
              f"{record['seconds']:.0f}s", flush=True)

    start = time.perf_counter()
    history = recall.train_recall(model, task, train_cfg, log=log, log_every=args.log_every)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = recall.evaluate_recall(model, task, args.eval_distances, num_examples=args.eval_examples,
                                      batch_size=args.eval_batch, use_memory=train_cfg.use_memory,
                                      seed=args.seed + 1000)
    # The same model with the key in a random segment 0 .. D (2D + 1 segments): does the search find
    # the evidence by its content, or only because it was always the first memory?
    anywhere = recall.evaluate_recall(model, task, args.eval_distances, num_examples=args.eval_examples,
                                      batch_size=args.eval_batch, use_memory=train_cfg.use_memory,
                                      seed=args.seed + 2000, evidence_segment=None)
    eval_seconds = time.perf_counter() - start
    tail = history[-50:]
    config = dataclasses.asdict(train_cfg)
    config["distances"] = list(config["distances"])
    return {
        "accuracy": {str(d): a for d, a in accuracy.items()},
        "accuracy_key_anywhere": {str(d): a for d, a in anywhere.items()},
        "final_answer_loss": sum(r["lm_loss"] for r in tail) / len(tail),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "hmt_config": {k: v for k, v in dataclasses.asdict(model.config).items()},
        "train_config": config,
    }


def table(rows: dict, distances, chance: float, trained) -> str:
    cols = [f"{d}{'' if d in trained else '*'}" for d in distances]
    head = "| variant | " + " | ".join(cols) + " | " + " | ".join(f"{c} (key anywhere)" for c in cols) + " | train s |"
    lines = [head, "|---" * (2 * len(distances) + 2) + "|"]
    for name, row in rows.items():
        cells = " | ".join(f"{100 * row[key][str(d)]:.1f}" for key in ("accuracy", "accuracy_key_anywhere")
                           for d in distances)
        lines.append(f"| {name} | {cells} | {row['train_seconds']:.0f} |")
    lines.append(f"| chance | " + " | ".join(f"{100 * chance:.2f}" for _ in range(2 * len(distances))) + " | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short version (about 2 minutes for the three variants): the CI test's probe, a "
                             "1-digit key (chance 10%%), d=32, 800 steps of batch 16 at distances 2-3; options given "
                             "explicitly still win")
    parser.add_argument("--variants", nargs="*", default=list(MAIN), choices=list(MAIN))
    parser.add_argument("--ablations", nargs="*", default=[], choices=list(ABLATIONS) + ["all"])
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--warmup", type=non_negative_int, default=30)
    parser.add_argument("--retrieval-loss-weight", type=non_negative_float, default=0.05)
    parser.add_argument("--train-distances", type=positive_int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--no-curriculum", action="store_true")
    parser.add_argument("--eval-distances", type=positive_int, nargs="+", default=[2, 4, 16, 64])
    parser.add_argument("--eval-examples", type=positive_int, default=None)
    parser.add_argument("--eval-batch", type=positive_int, default=100)
    parser.add_argument("--segment-length", type=positive_int, default=16)
    parser.add_argument("--sensory", type=non_negative_int, default=4)
    parser.add_argument("--cache", type=positive_int, default=96, help="num_memory_embeddings (must exceed the distance)")
    parser.add_argument("--compression", default="0", choices=["0", "false", "none", "identity", "embedding"],
                        help="memory_compression: 0, identity or embedding")
    parser.add_argument("--digits", type=positive_int, default=4)
    parser.add_argument("--vocab", type=positive_int, default=64)
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    check_output_file(parser, args.json, "--json", args.overwrite)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.compression = False if args.compression in ("0", "false", "False", "none") else args.compression
    if args.steps is None:
        args.steps = 2000
    if args.eval_examples is None:
        args.eval_examples = 500
    if max(args.eval_distances) >= args.cache:
        parser.error(f"argument --cache: {args.cache} must exceed the largest --eval-distances {max(args.eval_distances)}")
    torch.set_num_threads(args.threads)
    ablations = list(ABLATIONS) if "all" in args.ablations else args.ablations
    task = recall.RecallTask(segment_length=args.segment_length, num_digits=args.digits, vocab_size=args.vocab)
    print(f"recall probe: {args.digits}-digit key, L={args.segment_length}, k={args.sensory}, N={args.cache}, "
          f"tiny Llama d={args.hidden} x {args.layers} layers, vocab {args.vocab}; {args.steps} steps x batch "
          f"{args.batch_size}, trained distances {args.train_distances}; chance {task.chance:.4f}", flush=True)

    wall = time.perf_counter()
    rows, ablation_rows = {}, {}

    def save() -> None:  # after every row, so a long run can be stopped and keeps what it measured
        if args.json:
            result = {
                "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "chance": task.chance,
                "metric": "teacher-forced exact-answer accuracy (all digits argmax-correct), fraction",
                "variants": rows,
                "ablations": ablation_rows,
                "wall_seconds": round(time.perf_counter() - wall, 1),
                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": args.threads, "cpu": platform.processor() or platform.machine()},
            }
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    for name in args.variants:
        print(f"{name}:", flush=True)
        rows[name] = run_variant(name, args, {}, {})
        save()
    for name in ablations:
        what, hmt_overrides, train_overrides = ABLATIONS[name]
        print(f"ablation {name} ({what}):", flush=True)
        ablation_rows[name] = dict(run_variant("hmt", args, hmt_overrides, train_overrides), description=what)
        save()
    wall = time.perf_counter() - wall

    trained = set(args.train_distances)
    print("\nexact-answer accuracy (%) by distance in segments (* = never trained on); key in segment 0, "
          "then key in a random segment 0..D:")
    print(table(rows, args.eval_distances, task.chance, trained))
    if ablation_rows:
        print("\nablations (HMT, one change each):")
        print(table({**({"hmt": rows["hmt"]} if "hmt" in rows else {}), **ablation_rows},
                    args.eval_distances, task.chance, trained))
    print(f"\nwall time {wall:.0f}s")
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(run(main))
