"""What teaching recall costs on the CPU: examples/hour of the passkey curriculum's near stage.

The near stage of ``recipes/smollm2-passkey-curriculum.yaml`` (passkey examples with the key
256-1024 tokens back, micro-batches of 1 and 4 (--batch-sizes), LoRA r=8 on all linear layers from the
recipe's starting adapter, the supervised retrieval loss) run through ``hmt train``'s own loop for
a few steps per variant, each in its own process (``_teaching_worker.py``), on the same examples
in the same order:

* ``plain``: the plain backbone on the same examples (disjoint L-token segments, no memory);
* ``hmt_full``: HMT with full BPTT through every segment;
* ``hmt_full_ckpt``: the same with the recipe's ``gradient_checkpointing: true`` (set for the GPU's
  64-segment examples; every other variant runs without it);
* ``hmt_sparse``: evidence-sparse BPTT (``sparse_bptt: true``): only the evidence's and the
  answer's segments run with autograd;
* ``*_bf16``: the same in bf16 autocast (``precision: bf16``; CPUs with AMX/AVX-512 BF16 run it
  on their bf16 units);
* ``*_ddp``: the same in ``--processes`` processes under ``accelerate launch`` (DDP over gloo),
  each with ``--threads / --processes`` threads (1 on 2 cores), each reading its own examples of
  the same global batch: ``--grad-accum`` must be a multiple of ``--processes``, so that every
  variant takes the same optimizer steps over the same examples (2 processes equal 1 with the same
  global batch: ``tests/test_train.py``).

``--baseline-source DIR`` also times ``hmt_full`` (or ``--baseline-variant hmt_full_ckpt`` or
``hmt_full_ddp``) with the code of another checkout (its trainer, its recipe file), on the same
examples, and makes it the reference of the speed-ups: issue 17's "today's" is the code at the
commit the issue was filed at (7424c19). Issue 17's figure, with the global batch of
``recipes/smollm2-passkey-cpu.yaml``::

    git worktree add ../hmt-7424c19 7424c19
    python benchmarks/teaching_cost.py --threads 2 --steps 8 --warmup 1 --batch-sizes 1 --grad-accum 4 --repeats 3 \
        --baseline-source ../hmt-7424c19 --variants hmt_sparse_bf16 hmt_sparse_bf16_ddp plain_bf16_ddp

Figures per variant: examples/hour and processed tokens/s (every token read, the trainer's
``tokens_per_s``), measured after ``--warmup`` steps, the ratio to ``plain`` of the same
precision, the speed-up over the reference (``hmt_full`` at the smallest batch, or the
baseline checkout's), and the mean training loss over the run's steps (every variant trains on
the same examples in the same order: the same learning per example shows as the same losses).
The LM head runs on labelled positions only in every variant (``forward`` does that whenever
logits are not returned).

    python benchmarks/teaching_cost.py --json benchmarks/results/teaching_cost_cpu.json
    python benchmarks/teaching_cost.py --tiny --steps 4     # a smoke run on a tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hmt.arguments import Parser, check_output_file, positive_int, run as run_script  # noqa: E402

from _common import environment, table, write_json  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_teaching_worker.py")
ONE_PROCESS = ("plain", "hmt_full", "hmt_full_ckpt", "hmt_sparse", "plain_bf16", "hmt_full_bf16", "hmt_sparse_bf16")
VARIANTS = ONE_PROCESS + tuple(f"{name}_ddp" for name in ONE_PROCESS)


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(ONE_PROCESS), choices=VARIANTS)
    parser.add_argument("--steps", type=positive_int, default=8, help="training steps per variant and batch size")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4],
                        help="examples per micro-batch (each variant runs at each)")
    parser.add_argument("--grad-accum", type=positive_int, default=1,
                        help="micro-batches per optimizer step (for a _ddp variant, spread over its processes)")
    parser.add_argument("--processes", type=positive_int, default=2, help="processes of a _ddp variant")
    parser.add_argument("--warmup", type=positive_int, default=2, help="steps left out of the timing")
    parser.add_argument("--distances", type=positive_int, nargs=2, default=[256, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's own); a _ddp variant's processes share them")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and a word tokenizer: a smoke run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--baseline-source", default=None, metavar="DIR",
                        help="also time --baseline-variant at the smallest batch with the hmt code of another checkout DIR (e.g. the "
                             "commit issue 17 was filed at, 7424c19, checked out with git worktree), on the same examples; "
                             "the speed-ups are then against it")
    parser.add_argument("--baseline-variant", default="hmt_full", choices=("hmt_full", "hmt_full_ckpt", "hmt_full_ddp"),
                        help="what --baseline-source runs: full BPTT, with or without the recipe's gradient checkpointing, "
                             "or in --processes processes")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="run every variant this many times, in interleaved rounds, and report the median "
                             "(a shared machine's pace drifts by 10-20%% between runs)")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if args.baseline_source and not os.path.isfile(os.path.join(args.baseline_source, "src", "hmt", "__init__.py")):
        parser.error(f"--baseline-source {args.baseline_source}: no src/hmt/__init__.py there (a checkout of this repository)")
    names = args.variants + ([args.baseline_variant] if args.baseline_source else [])
    if any(n.endswith("_ddp") for n in names) and args.grad_accum % args.processes:
        parser.error(f"--grad-accum ({args.grad_accum}) must be a multiple of --processes ({args.processes}) for a _ddp "
                     f"variant: every variant takes the same global batch (try --grad-accum {args.processes})")
    check_output_file(parser, args.json, "--json", args.overwrite)
    runs = [(ROOT, b, n) for b in args.batch_sizes for n in args.variants]
    if args.baseline_source:  # right after this checkout's first variant
        runs.insert(1, (args.baseline_source, min(args.batch_sizes), args.baseline_variant))
    commits = {source: _commit(source) for source, _, _ in runs}
    rounds, scratch = {}, tempfile.TemporaryDirectory()
    threads = args.threads or torch.get_num_threads()
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--distances", *map(str, args.distances)]
    common += ["--tiny"] if args.tiny else []
    for batch_size in args.batch_sizes:  # drawn once with this checkout's code, read by every variant
        _worker([sys.executable, WORKER, "draw", "--source", ROOT, *common, "--batch-size", str(batch_size),
                 "--examples", _examples_file(scratch.name, batch_size),
                 "--draw", str(args.steps * batch_size * args.grad_accum)], "drawing the examples")
    for round_, (source, batch_size, name) in [(r, run) for r in range(args.repeats) for run in runs]:
        # each in a fresh process: accelerate fixes the precision once per process
        processes = args.processes if name.endswith("_ddp") else 1
        launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
                   "--dynamo_backend", "no"] if processes > 1 else [sys.executable])
        command = launch + [WORKER, name.removesuffix("_ddp"), "--source", source, *common, "--batch-size", str(batch_size),
                            "--grad-accum", str(args.grad_accum // processes), "--examples",
                            _examples_file(scratch.name, batch_size), "--threads", str(max(1, threads // processes))]
        result = _worker(command, f"variant {name} ({source})")
        commit = commits[source]
        key = f"{name}_b{batch_size}" + ("" if source == ROOT else f"@{commit}")
        print(f"  {key} (round {round_ + 1}): {result['examples_per_hour']:.0f} examples/hour, "
              f"{result['tokens_per_s']:.0f} tokens/s", flush=True)
        rounds.setdefault(key, []).append(dict(result, variant=name, batch_size=batch_size, commit=commit))
    scratch.cleanup()
    rows = {key: median_round(results) for key, results in rounds.items()}
    # The reference: the recipe as it was (full BPTT, fp32, the smallest batch), on --baseline-source's code if given.
    reference = next((k for k in rows if "@" in k), f"hmt_full_b{min(args.batch_sizes)}")
    for key, row in rows.items():
        variant = row["variant"]
        plain = ("plain_bf16" if "_bf16" in variant else "plain") + ("_ddp" if variant.endswith("_ddp") else "")
        plain += f"_b{row['batch_size']}"
        if plain in rows and "@" not in key:
            row["time_vs_plain"] = rows[plain]["examples_per_hour"] / row["examples_per_hour"]
        if reference in rows:
            row["speedup_vs_reference"] = row["examples_per_hour"] / rows[reference]["examples_per_hour"]
    for row in rows.values():  # the same learning per example: the loss over the same examples, step by step
        row["mean_loss"] = sum(row["losses"]) / len(row["losses"])
    print(table(["variant", "examples/hour", "tokens/s", "time / plain", f"x {reference}", "mean loss"],
                [[n, r["examples_per_hour"], r["tokens_per_s"], r.get("time_vs_plain"), r.get("speedup_vs_reference"),
                  r["mean_loss"]] for n, r in rows.items()]))
    write_json(args.json, {"command": "python benchmarks/teaching_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "recipe_stage": "near", "settings": vars(args), "reference": reference, "variants": rows,
                           "environment": environment(torch.device("cpu"))})


def _worker(command: list, what: str) -> dict:
    """Run ``_teaching_worker.py`` (under ``accelerate launch`` for a _ddp variant); its RESULT line."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _examples_file(folder: str, batch_size: int) -> str:
    return os.path.join(folder, f"examples_b{batch_size}.jsonl")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_round(results: list) -> dict:
    """The round with the median examples/hour (the upper middle of an even count), with every
    round's figure under ``rounds`` in the order they ran."""
    ordered = sorted(results, key=lambda r: r["examples_per_hour"])
    return dict(ordered[len(ordered) // 2], rounds=[r["examples_per_hour"] for r in results])


def _commit(source: str) -> str:
    """The short commit of checkout ``source`` (``?`` outside git)."""
    done = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(run_script(main))
