"""What the memory holds: is a passkey linearly decodable from the memory an adapter writes?

Recall has two halves: *writing* (the segment that holds the key must leave it in its memory
m_n) and *reading* (a later segment must decode it from P_n). This script measures the first
half alone, with no training of the model: it reads single segments that hold a random 5-digit
key (``hmt.passkey``'s key sentence after a random filler prefix, filler after it), collects
per segment

  m_last   the final hidden state at the memory slot, before compression (the paper's m_n)
  P        what a later segment reads: m_n after the adapter's compression
  mean     the mean of the segment's final hidden states (what ``extraction_strategy="mean"`` pools)

and fits, for each of the key's five digits, a linear classifier (softmax regression) on three
quarters of the segments, scoring it on the rest (chance 0.10). High accuracy for P with recall
still at chance means the read is what fails, not the write.

    python benchmarks/memory_content.py                                           # the shipped adapter
    python benchmarks/memory_content.py --adapter runs/smollm2-passkey-cpu/short/final --json out.json
"""

from __future__ import annotations

import random
import shlex
import sys

import torch

from _common import add_adapter_argument, add_json_argument, check_json, make_parser, positive_int, table, write_json
from hmt.arguments import run
from hmt.passkey import FILLER, needle

FEATURES = ("m_last", "P", "mean")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_adapter_argument(parser)
    parser.add_argument("--segments", type=positive_int, default=320, help="key segments to read (default 320)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=5)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    check_json(parser, args)
    if args.segments < 8:
        parser.error("--segments must be at least 8 (a quarter of them is the held-out part).")
    return args


def key_segments(tokenizer, length: int, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` segments of ``length`` tokens, each with a random 5-digit key after 0-127 filler tokens."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    filler = encode(FILLER) * (2 * length // len(encode(FILLER)) + 2)
    rng = random.Random(seed)
    rows, keys = [], []
    for _ in range(count):
        key = str(rng.randrange(10**4, 10**5))
        sentence = encode(needle(key))
        prefix = rng.randrange(0, max(1, min(128, length - len(sentence))))
        rows.append((filler[:prefix] + sentence + filler)[:length])
        keys.append(key)
    return torch.tensor(rows), keys


def probe_accuracy(features: torch.Tensor, digits: torch.Tensor, train: int, steps: int = 300) -> list[float]:
    """Held-out accuracy per digit of a softmax regression fitted on the first ``train`` rows."""
    x = features.float()
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    accuracy = []
    for d in range(digits.shape[1]):
        torch.manual_seed(d)
        linear = torch.nn.Linear(x.shape[1], 10)
        optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(linear(x[:train]), digits[:train, d]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy.append(float((linear(x[train:]).argmax(-1) == digits[train:, d]).float().mean()))
    return accuracy


def main(argv=None) -> None:
    args = parse_args(argv)
    import hmt
    from hmt.memory import pool

    torch.manual_seed(0)
    model, tokenizer = hmt.load_pretrained(args.adapter)
    ids, keys = key_segments(tokenizer, model.config.segment_length, args.segments, args.seed)
    caught = {}
    hook = model.memory_generator.register_forward_hook(
        lambda module, inputs, output: caught.update(hidden=inputs[0], mask=inputs[1], out=output))
    collected = {name: [] for name in FEATURES}
    try:
        with torch.no_grad():
            for start in range(0, len(ids), args.batch_size):
                rows = ids[start : start + args.batch_size]
                model.memory_step(model.new_memory(rows.shape[0]), rows)
                collected["m_last"].append(pool(caught["hidden"], caught["mask"], "last"))
                collected["P"].append(caught["out"])
                collected["mean"].append(pool(caught["hidden"], caught["mask"], "mean"))
    finally:
        hook.remove()
    digits = torch.tensor([[int(c) for c in key] for key in keys])
    train = args.segments * 3 // 4
    results = {name: probe_accuracy(torch.cat(parts), digits, train) for name, parts in collected.items()}
    print(table(["feature", "digit 1", "digit 2", "digit 3", "digit 4", "digit 5"],
                [[name] + [f"{a:.2f}" for a in acc] for name, acc in results.items()]))
    print(f"(held-out accuracy of a linear probe, {args.segments - train} segments; chance 0.10)")
    command = shlex.join(["python", "benchmarks/memory_content.py", *(sys.argv[1:] if argv is None else argv)])
    write_json(args.json, {"command": command,
                           "adapter": args.adapter, "segments": args.segments,
                           "held_out": args.segments - train, "accuracy_per_digit": results})


if __name__ == "__main__":
    sys.exit(run(main))
