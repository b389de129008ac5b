"""Does the recall probe learn for every seed? Each lever on and off, five seeds, mean and worst.

The failure this measures: on the recall probe (``hmt.recall``) some seeds never leave an answer
loss of ln 10 (a uniform guess over the digits) while others learn in a few dozen steps. The
smallest setting that shows it: a 1-digit key, the key in segment 0 and the query 1 segment later
(the cache holds one memory, so the search cannot fail: only writing and reading the memory are
learned), a tiny Llama (d = 64, 2 layers) trained from scratch, 400 steps of batch 32. Each lever
changes one thing; every row trains the same seeds with the same initialisation and data stream.

Figures per seed: the mean answer loss over the last 30 steps and the first step whose loss is
below 1.0 (None: never). ``--anywhere`` trains instead with the key in a random segment at
distances 1-3 and reports exact accuracy 4 and 8 segments back with the key anywhere (the CI
test's setting, 600 steps of batch 16 on d = 32).

    python benchmarks/recall_seeds.py --json benchmarks/results/recall_seeds_cpu.json
    python benchmarks/recall_seeds.py --anywhere --levers paper norm --json benchmarks/results/recall_seeds_anywhere_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hmt  # noqa: E402
from hmt.arguments import Parser, check_output_file, positive_int, run as run_script  # noqa: E402
from hmt import recall  # noqa: E402

from _common import table, write_json  # noqa: E402

# name -> (what it changes, HMTConfig overrides, RecallTrainConfig overrides)
LEVERS = {
    "paper": ("the paper's settings: no compression, lr 3e-3", {}, {}),
    "norm": ("memory_compression='norm': memories at the token embeddings' scale", {"memory_compression": "norm"}, {}),
    "embedding": ("memory_compression='embedding': b + W m/|m| (W = 0 at init)", {"memory_compression": "embedding"}, {}),
    "lr_1e-3": ("every learning rate 1e-3 instead of 3e-3", {}, {"lr": 1e-3}),
    "hmt_lr_x10": ("HMT's own parameters at 10 x the backbone's learning rate", {}, {"hmt_lr": 3e-2}),
}



def run(lever: str, seed: int, args) -> dict:
    _, hmt_overrides, train_overrides = LEVERS[lever]
    torch.manual_seed(seed)
    hidden, vocab = (32, 32) if args.anywhere else (64, 64)
    task = recall.RecallTask(segment_length=16, num_digits=1, vocab_size=vocab)
    backbone = recall.tiny_llama(vocab_size=vocab, hidden_size=hidden, layers=2, heads=2 if args.anywhere else 4, seed=seed)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=20,
                                            **hmt_overrides))
    config = dict(steps=args.steps, batch_size=16 if args.anywhere else 32, distances=(1, 2, 3) if args.anywhere else (1,),
                  curriculum=False, lr=3e-3, warmup_steps=20 if args.anywhere else 30, seed=seed,
                  evidence_segment=None if args.anywhere else 0)
    config.update(train_overrides)
    start = time.process_time()
    history = recall.train_recall(model, task, recall.RecallTrainConfig(**config))
    row = {"final_answer_loss": sum(r["lm_loss"] for r in history[-30:]) / 30,
           "first_step_below_1": next((r["step"] for r in history if r["lm_loss"] < 1.0), None),
           "cpu_seconds": time.process_time() - start}
    if args.anywhere:
        accuracy = recall.evaluate_recall(model, task, [4, 8], num_examples=200, seed=seed + 1, evidence_segment=None)
        row.update({f"accuracy_{d}_anywhere": a for d, a in accuracy.items()})
    return row


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=positive_int, default=None, help="default: 400 (600 with --anywhere)")
    parser.add_argument("--anywhere", action="store_true", help="the CI test's setting: key in a random segment")
    parser.add_argument("--json", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    check_output_file(parser, args.json, "--json", args.overwrite)
    args.steps = args.steps or (600 if args.anywhere else 400)
    torch.set_num_threads(1)
    rows = {}
    for lever in args.levers:
        rows[lever] = {seed: run(lever, seed, args) for seed in args.seeds}
        for seed, row in rows[lever].items():
            print(f"{lever} seed {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in row.items()), flush=True)
        write_json(args.json, {"command": "python benchmarks/recall_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                               "settings": vars(args), "levers": {k: LEVERS[k][0] for k in rows},
                               "rows": {k: {str(s): r for s, r in v.items()} for k, v in rows.items()}})
    key = "accuracy_4_anywhere" if args.anywhere else "final_answer_loss"
    worst = min if args.anywhere else max
    print(table(["lever", "learned (loss < 0.5)", f"mean {key}", f"worst {key}", "first step < 1.0 per seed"],
                [[lever, sum(r["final_answer_loss"] < 0.5 for r in seeds.values()),
                  sum(r[key] for r in seeds.values()) / len(seeds), worst(r[key] for r in seeds.values()),
                  " ".join(str(r["first_step_below_1"]) for r in seeds.values())] for lever, seeds in rows.items()]))


if __name__ == "__main__":
    sys.exit(run_script(main))
