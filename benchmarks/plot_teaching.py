"""The curves of a staged passkey teaching run: training loss (answers and mixed-in LM windows,
a moving average), retrieval loss and write loss per stage; each stage's held-out answer perplexity
against chance (a 5-digit key: 5 digit tokens at 1/10 and two predictable tokens, 10^(5/7)) and
held-out LM perplexity (the main job's, from a stage's ppl.json, else the trainer's validation
documents; a shipped_ppl.json beside the stages draws the starting adapter's as a line); and, for
stages whose folder holds a passkey.json (examples/passkey.py), whole-key accuracy by key distance.

    python benchmarks/plot_teaching.py benchmarks/results/smollm2-passkey-cpu --stages near short copy pointer_lm gentle memory_only gentler pointer_lm_split80 \
        --out docs/figures/passkey_teaching.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hmt.arguments import Parser, check_output_file, run


def stage_color(index: int, count: int):
    """A colour per stage: matplotlib's ten cycle colours, tab20's twenty past ten stages."""
    if count <= 10:
        return f"C{index}"
    import matplotlib

    return matplotlib.colormaps["tab20"](index % 20)


def moving_average(values: list, window: int) -> list:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


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

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    (ax1, ax2, ax3), (ax4, ax5, ax6) = axes
    offset, names, answers, documents, main_job = 0, [], [], [], []
    for index, stage in enumerate(stages):
        color, marker = stage_color(index, len(stages)), "osD^v<>ph*"[index % 10]
        rows = [json.loads(line) for line in open(stage / "metrics.jsonl")]
        rows.sort(key=lambda r: r["step"])
        steps = [offset + r["step"] for r in rows]
        ax1.plot(steps, moving_average([r["loss"] for r in rows], args.window), color=color, label=stage.name)
        ax2.plot(steps, [r.get("retrieval_loss") or 0.0 for r in rows], color=color)
        if any(r.get("write_loss") for r in rows):
            ax3.plot(steps, moving_average([r.get("write_loss") or 0.0 for r in rows], args.window), color=color)
        offset = steps[-1]
        final = rows[-1]
        names.append(stage.name)
        answers.append(final.get("val_answers_ppl", float("nan")))
        documents.append(final.get("val_documents_ppl", float("nan")))
        ppl = stage / "ppl.json"  # examples/main.py's results.json: the main job's held-out documents
        main_job.append(json.loads(ppl.read_text())["protocols"]["hmt"]["ppl"] if ppl.is_file() else None)
        passkey = stage / "passkey.json"
        if passkey.is_file():
            hmt = json.loads(passkey.read_text()).get("hmt", {})
            distances = sorted(hmt, key=int)
            ax5.plot([int(d) for d in distances], [hmt[d] for d in distances], color=color, marker=marker,
                     markersize=9 - index % 3 * 2, label=stage.name)
    ax1.set(title="training loss (moving average)", xlabel="optimizer step (stages end to end)")
    ax2.set(title="retrieval loss", xlabel="optimizer step")
    ax3.set(title="write loss (moving average; copy write only)", xlabel="optimizer step")
    colors = [stage_color(i, len(names)) for i in range(len(names))]  # as in the loop above: a colour per stage
    ax4.bar(names, answers, color=colors)
    ax4.axhline(10 ** (5 / 7), color="k", linestyle="--", label="chance (5 digits)")
    ax4.set(title="held-out answer perplexity at the stage's end", ylim=(0, 6))
    ax5.set(title="passkey, whole key (examples/passkey.py)", xlabel="key distance (tokens)",
            ylabel="accuracy", xscale="log", ylim=(-0.05, 1.05))
    # The main job's held-out perplexity where the stage folder has it (ppl.json), else the
    # trainer's validation documents (hatched: another split's documents, not comparable).
    ax6.bar(names, [m if m is not None else d for m, d in zip(main_job, documents)], color=colors,
            hatch=[None if m is not None else "//" for m in main_job])
    shipped = Path(args.folder) / "shipped_ppl.json"
    if shipped.is_file():
        ax6.axhline(json.loads(shipped.read_text())["protocols"]["hmt"]["ppl"], color="k", linestyle="--",
                    label="the adapter taught from (main job)")
        ax6.legend(loc="lower right")
    ax6.set(title="held-out LM ppl (solid: main job; hatched: trainer)", ylim=(8, None))
    ax1.legend(fontsize=8, ncol=2)
    for ax in (ax4, ax5):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (ax4, ax6):
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run(main))
