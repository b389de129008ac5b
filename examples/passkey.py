"""Passkey retrieval with the shipped adapter: accuracy against distance, HMT vs the backbone's own window.

    python examples/passkey.py --distances 256 1024 4096 16384 --trials 3 --out outputs/passkey
    python examples/passkey.py --write-task outputs/passkey_task.jsonl   # training data for recipes/smollm2-passkey.yaml
                                                                         # (an existing file: add --overwrite)
    python examples/passkey.py --write-task outputs/passkey_chat.jsonl --chat --task-count 400
                                        # the same, as `hmt chat` reads a conversation (filler turns: training-split text)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hmt  # noqa: E402
from hmt import checkpoint, passkey  # noqa: E402
from hmt.arguments import Parser, check_output_dir, check_output_file, non_negative_int, positive_int, run  # noqa: E402
from hmt.utils import quiet_libraries  # noqa: E402


def training_paragraphs(tokenizer, tokens: tuple = (100, 250), count: int = 2000, seed: int = 3) -> list:
    """Passages of the training split (the main job's [0.8, 0.1, 0.1]) of kjv and python-docs, of
    ``tokens`` (min, max) tokens each: the other turns of a chat passkey example."""
    import random

    from hmt import data as hdata

    corpus = hdata.TokenizedCorpus.from_source(["kjv", "python-docs"], tokenizer, progress=False)
    train = hdata.split_documents(corpus, "train", [0.8, 0.1, 0.1])
    rng = random.Random(seed)
    documents = [train.document(i) for i in range(train.num_documents) if len(train.document(i)) > tokens[1]]
    passages = []
    for _ in range(count):
        ids = rng.choice(documents)
        length = rng.randint(*tokens)
        start = rng.randrange(0, len(ids) - length)
        passages.append(" ".join(tokenizer.decode(ids[start:start + length]).split()))
    return passages


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=hmt.DEFAULT_ADAPTER)
    parser.add_argument("--distances", type=positive_int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--trials", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="trials read side by side, each its own stream (the same keys and answers; faster on a GPU)")
    parser.add_argument("--full-attention-limit", type=non_negative_int, default=8192,
                        help="also the backbone over the whole prompt up to this length")
    parser.add_argument("--recurrence", action=argparse.BooleanOptionalAction, default=True,
                        help="also the same weights with retrieval off (use_retrieval=False)")
    parser.add_argument("--out", type=Path, default=Path("outputs/passkey"))
    parser.add_argument("--write-task", type=Path, default=None, metavar="JSONL",
                        help="instead: write passkey training examples here (recipes/smollm2-passkey.yaml) and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --write-task file")
    parser.add_argument("--task-count", type=positive_int, default=4000)
    parser.add_argument("--task-distances", type=positive_int, nargs=2, default=[200, 600], metavar=("MIN", "MAX"))
    parser.add_argument("--chat", action="store_true",
                        help="with --write-task: conversations as `hmt chat` reads them (hmt.passkey.chat_task_examples), "
                             "2-4 messages of training-split kjv and python-docs text between the key and the question; "
                             "--task-distances does not apply")
    args = parser.parse_args(argv)
    if args.chat and not args.write_task:
        parser.error("--chat writes training examples: give --write-task JSONL")
    quiet_libraries()
    if args.write_task:
        if args.task_distances[0] > args.task_distances[1]:
            parser.error(f"argument --task-distances: MIN {args.task_distances[0]} is above MAX {args.task_distances[1]}")
        check_output_file(parser, args.write_task, "--write-task", args.overwrite)
        tokenizer = hmt.load_backbone()[1]
        if args.chat:
            examples = passkey.chat_task_examples(tokenizer, args.task_count, training_paragraphs(tokenizer))
        else:
            examples = passkey.task_examples(tokenizer, args.task_count, *args.task_distances)
        print(f"wrote {len(examples)} examples to {passkey.write_task(args.write_task, examples)}")
        return
    check_output_dir(parser, args.out, "--out")
    checkpoint.resolve(args.adapter)  # a clear error before anything loads
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = hmt.load_pretrained(args.adapter)
    results = passkey.run(model, tokenizer, args.distances, trials=args.trials, full_attention_limit=args.full_attention_limit,
                          recurrence=args.recurrence, batch_size=args.batch_size)
    names = list(results)
    print(f"{'distance':>9} " + " ".join(f"{n:>8}" for n in names))
    for d in args.distances:
        print(f"{d:>9} " + " ".join(f"{results[n].get(d, float('nan')):>8.2f}" for n in names))
    (args.out / "passkey.json").write_text(json.dumps({n: {str(k): v for k, v in r.items()} for n, r in results.items()}, indent=2))
    passkey.plot(results, args.out / "passkey.png")
    print(f"wrote {args.out}/passkey.json and passkey.png")


if __name__ == "__main__":
    sys.exit(run(main))
