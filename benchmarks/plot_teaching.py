"""The curves of a staged passkey teaching run: training loss (answers and mixed-in LM windows,
a moving average) and retrieval loss per stage, with each stage's held-out answer perplexity
against chance (a 5-digit key: 5 digit tokens at 1/10 and two predictable tokens, 10^(5/7)).

    python benchmarks/plot_teaching.py benchmarks/results/smollm2-passkey-cpu --stages near short short_sink short_mean \
        --out docs/figures/passkey_teaching.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hmt.arguments import Parser, check_output_file, run


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder of stage folders, each with a metrics.jsonl")
    parser.add_argument("--stages", nargs="+", default=None, help="stage folders in training order (default: all, by name)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--window", type=int, default=20, help="moving-average window (logged steps)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_output_file(parser, args.out, "--out", args.overwrite)
    stages = ([Path(args.folder) / name for name in args.stages] if args.stages
              else sorted(p.parent for p in Path(args.folder).glob("*/metrics.jsonl")))
    missing = [str(p / "metrics.jsonl") for p in stages if not (p / "metrics.jsonl").is_file()]
    if not stages or missing:
        raise ValueError(f"no metrics.jsonl in {', '.join(missing) or args.folder + '/*'}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    offset, names, answers = 0, [], []
    for stage in stages:
        rows = [json.loads(line) for line in open(stage / "metrics.jsonl")]
        rows.sort(key=lambda r: r["step"])
        loss = [r["loss"] for r in rows]
        smooth = [sum(loss[max(0, i - args.window + 1): i + 1]) / len(loss[max(0, i - args.window + 1): i + 1])
                  for i in range(len(loss))]
        steps = [offset + r["step"] for r in rows]
        ax1.plot(steps, smooth, label=stage.name)
        ax2.plot(steps, [r.get("retrieval_loss") or 0.0 for r in rows], label=stage.name)
        offset = steps[-1]
        final = rows[-1]
        names.append(stage.name)
        answers.append(final.get("val_answers_ppl", float("nan")))
    ax1.set(title="training loss (moving average)", xlabel="optimizer step (stages end to end)")
    ax2.set(title="retrieval loss", xlabel="optimizer step")
    ax3.bar(names, answers)
    ax3.axhline(10 ** (5 / 7), color="k", linestyle="--", label="chance (5 digits)")
    ax3.set(title="held-out answer perplexity at the stage's end", ylim=(0, 6))
    for ax in (ax1, ax2, ax3):
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run(main))
