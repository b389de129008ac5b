"""Evidence-sparse BPTT against full BPTT on the recall probe: same accuracy, less training time?

The CI test's probe (``hmt.recall``: a 1-digit key in a random segment, a tiny Llama with d = 32
trained from scratch, memories at the token scale with ``memory_compression='norm'``), trained
600 steps of batch 16 with distances growing 1 -> 16 segments over the first 30% of the steps
(examples of up to 33 segments), once with full BPTT through every segment and once with
``sparse_bptt`` (only the key's and the query's segments run with autograd; the key's position
is then drawn per batch), and with ``sparse_negN`` (sparse plus N other segments drawn at random
per batch, ``sparse_negatives``). Accuracy is exact, 200 fresh examples per distance, key anywhere,
4, 16 and 64 segments back. One CPU thread; train time is wall-clock.

    python benchmarks/sparse_bptt_recall.py --json benchmarks/results/sparse_bptt_recall_cpu.json
    python benchmarks/sparse_bptt_recall.py --modes sparse_neg2 --seeds 0 1 2 3 4 --max-distance 4 --steps 1000
    python benchmarks/sparse_bptt_recall.py --modes sparse sparse_neg2 --seeds 0 1 2 3 4 --max-distance 4 \
        --steps 1000 --write-loss 1

``--write-loss`` adds the write loss (``RecallTrainConfig.write_loss_weight``): the key segment's
memory, read as a token, must name the key.
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

TASK = recall.RecallTask(segment_length=16, num_digits=1, vocab_size=32)
EVAL_DISTANCES = [4, 16, 64]



def negatives(mode: str) -> int:
    return int(mode[len("sparse_neg"):]) if mode.startswith("sparse_neg") else 0


def mode_name(value: str) -> str:
    if value in ("full", "sparse") or (value.startswith("sparse_neg") and value[len("sparse_neg"):].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"expected full, sparse or sparse_negN (N other segments with autograd), got {value!r}")


def run(mode: str, seed: int, steps: int, max_distance: int, write_loss: float = 0.0) -> dict:
    torch.manual_seed(seed)
    backbone = recall.tiny_llama(vocab_size=TASK.vocab_size, hidden_size=32, layers=2, heads=2, seed=seed)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=160,
                                            memory_compression="norm"))
    distances = tuple(d for d in (1, 2, 4, 8, 16, 32) if d <= max_distance)
    config = recall.RecallTrainConfig(steps=steps, batch_size=16, distances=distances, curriculum=True,
                                      curriculum_fraction=0.3, lr=3e-3, warmup_steps=20, seed=seed,
                                      evidence_segment=None, sparse_bptt=mode.startswith("sparse"),
                                      sparse_negatives=negatives(mode), write_loss_weight=write_loss)
    start = time.perf_counter()
    history = recall.train_recall(model, TASK, config)
    train_s = time.perf_counter() - start
    accuracy = recall.evaluate_recall(model, TASK, EVAL_DISTANCES, num_examples=200, seed=seed + 1, evidence_segment=None)
    return {"train_s": train_s, "final_answer_loss": sum(r["lm_loss"] for r in history[-30:]) / 30,
            **{f"accuracy_{d}_anywhere": a for d, a in accuracy.items()}}


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=positive_int, default=600)
    parser.add_argument("--max-distance", type=positive_int, default=16, help="largest training distance (segments)")
    parser.add_argument("--modes", type=mode_name, nargs="+", default=["full", "sparse", "sparse_neg2"])
    parser.add_argument("--write-loss", type=float, default=0.0,
                        help="write_loss_weight: the key segment's memory, read as a token, must name the key")
    parser.add_argument("--json", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    check_output_file(parser, args.json, "--json", args.overwrite)
    if args.write_loss < 0:
        parser.error(f"--write-loss must be 0 or more, not {args.write_loss}")
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        for mode in args.modes:
            row = dict(run(mode, seed, args.steps, args.max_distance, args.write_loss), mode=mode, seed=seed,
                       write_loss=args.write_loss)
            rows.append(row)
            print(row, flush=True)
            write_json(args.json, {"command": "python benchmarks/sparse_bptt_recall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                   "settings": vars(args), "rows": rows})
    print(table(["seed", "BPTT", "train s", *[f"{d} back" for d in EVAL_DISTANCES], "final answer loss"],
                [[r["seed"], r["mode"], r["train_s"], *[100 * r[f"accuracy_{d}_anywhere"] for d in EVAL_DISTANCES],
                  r["final_answer_loss"]] for r in rows]))


if __name__ == "__main__":
    sys.exit(run_script(main))
