"""What teaching recall costs on the CPU: examples/hour of the passkey curriculum's near stage.

The near stage of ``recipes/smollm2-passkey-curriculum.yaml`` (passkey examples with the key
256-1024 tokens back, batch 1 and 4 (--batch-sizes), LoRA r=8 on all linear layers from the shipped adapter, the
supervised retrieval loss) run through ``hmt train``'s own loop for a few steps per variant, in
one process, on the same examples in the same order:

* ``plain``: the plain backbone on the same examples (disjoint L-token segments, no memory);
* ``hmt_full``: HMT with full BPTT through every segment (the recipe as it was);
* ``hmt_sparse``: evidence-sparse BPTT (``sparse_bptt: true``): only the evidence's and the
  answer's segments run with autograd;
* ``*_bf16``: the same in bf16 autocast (``precision: bf16``; CPUs with AMX/AVX-512 BF16 run it
  on their bf16 units).

Figures per variant: examples/hour and processed tokens/s (every token read, the trainer's
``tokens_per_s``), measured after ``--warmup`` steps, and the ratio to ``plain`` of the same
precision. The LM head runs on labelled positions only in every variant (``forward`` does that
whenever logits are not returned).

    python benchmarks/teaching_cost.py --json benchmarks/results/teaching_cost_cpu.json
    python benchmarks/teaching_cost.py --tiny --steps 4     # a smoke run on a tiny random model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hmt  # noqa: E402
from hmt.arguments import Parser, check_output_file, positive_int, run as run_script  # noqa: E402
from hmt import passkey  # noqa: E402
from hmt.data import QADataset  # noqa: E402
from hmt.train import TrainConfig, load_recipe, train  # noqa: E402

from _common import environment, table, write_json  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "smollm2-passkey-curriculum.yaml")
VARIANTS = ("plain", "hmt_full", "hmt_sparse", "plain_bf16", "hmt_full_bf16", "hmt_sparse_bf16")



def variant_config(base: TrainConfig, name: str, steps: int, out_dir: str, batch_size: int = 1) -> TrainConfig:
    changes = dict(steps=steps, batch_size=batch_size, output_dir=os.path.join(out_dir, name), log_every=1, eval_every=10**6,
                   save_every=10**6, progress=False, mix_fraction=0.0, mix_data=None, gradient_checkpointing=False,
                   precision="bf16" if name.endswith("_bf16") else "fp32")
    if name.startswith("plain"):
        changes.update(use_memory=False, retrieval_loss_weight=0.0)
    if "sparse" in name:
        changes["sparse_bptt"] = True  # only on a trainer that has it: the others run without the field
    return dataclasses.replace(base, **changes)


def run_variant(config: TrainConfig, backbone, tokenizer, data, warmup: int) -> dict:
    backbone.zero_grad(set_to_none=True)
    start = time.perf_counter()
    result = train(config, backbone=backbone, tokenizer=tokenizer, train_data=data, eval_data=None, resume=False)
    wall = time.perf_counter() - start
    timed = [r for r in result.history if "elapsed_s" in r]
    first, last = timed[warmup - 1], timed[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    examples = (last["step"] - first["step"]) * config.batch_size
    tokens = sum(int(data[i]["input_ids"].shape[0]) for i in range(len(data)))  # read once per example
    mean_tokens = tokens / len(data)
    return {"examples_per_hour": examples / seconds * 3600, "seconds_per_example": seconds / examples,
            "tokens_per_s": examples * mean_tokens / seconds, "mean_tokens_per_example": mean_tokens,
            "final_loss": result.history[-1]["loss"], "wall_s": wall, "steps_timed": last["step"] - first["step"]}


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=positive_int, default=8, help="training steps per variant and batch size")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4],
                        help="examples per step (each variant runs at each)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="steps left out of the timing")
    parser.add_argument("--distances", type=positive_int, nargs=2, default=[256, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and a word tokenizer: a smoke run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--worker", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if not args.worker:
        check_output_file(parser, args.json, "--json", args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # one variant in this process (accelerate fixes the precision once per process)
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = {}
    for batch_size, name in [(b, n) for b in args.batch_sizes for n in args.variants]:  # each in a fresh process
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--distances", *map(str, args.distances),
                   "--batch-sizes", str(batch_size)]
        command += (["--threads", str(args.threads)] if args.threads else []) + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        key = f"{name}_b{batch_size}"
        rows[key] = dict(json.loads(lines[-1][len("RESULT "):]), variant=name, batch_size=batch_size)
        print(f"  {key}: {rows[key]['examples_per_hour']:.0f} examples/hour, "
              f"{rows[key]['tokens_per_s']:.0f} tokens/s", flush=True)
    reference = f"hmt_full_b{min(args.batch_sizes)}"  # the recipe as it was: full BPTT, fp32, the smallest batch
    for key, row in rows.items():
        plain = ("plain_bf16" if row["variant"].endswith("_bf16") else "plain") + f"_b{row['batch_size']}"
        if plain in rows:
            row["time_vs_plain"] = rows[plain]["examples_per_hour"] / row["examples_per_hour"]
        if reference in rows:
            row["speedup_vs_hmt_full_fp32"] = row["examples_per_hour"] / rows[reference]["examples_per_hour"]
    print(table(["variant", "examples/hour", "tokens/s", "time / plain", f"x {reference}"],
                [[n, r["examples_per_hour"], r["tokens_per_s"], r.get("time_vs_plain"), r.get("speedup_vs_hmt_full_fp32")]
                 for n, r in rows.items()]))
    write_json(args.json, {"command": "python benchmarks/teaching_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "recipe_stage": "near", "settings": vars(args), "variants": rows,
                           "environment": environment(torch.device("cpu"))})


def worker(args) -> dict:
    (stage, base), *_ = load_recipe(RECIPE)
    if args.tiny:
        from hmt.recall import tiny_llama

        backbone = tiny_llama(vocab_size=256, hidden_size=64, layers=2, max_positions=1024)
        tokenizer = _byte_tokenizer()
        base = dataclasses.replace(base, init_from=None, hmt=dict(base.hmt, segment_length=64, representation_length=32,
                                                                  sensory_memory_size=8, memory_compression=False))
    else:
        backbone, tokenizer = hmt.load_backbone(base.backbone)
    (batch_size,) = args.batch_sizes
    examples = passkey.task_examples(tokenizer, args.steps * batch_size, *args.distances, seed=987654)
    data = QADataset(examples, tokenizer, progress=False, **base.qa_options)
    with tempfile.TemporaryDirectory() as out_dir:
        config = variant_config(base, args.worker, args.steps, out_dir, batch_size)
        row = run_variant(config, backbone, tokenizer, data, args.warmup)
    return dict(row, threads=torch.get_num_threads())


def _byte_tokenizer():
    """A tokenizer over single characters (ids < 256), for --tiny."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


if __name__ == "__main__":
    sys.exit(run_script(main))
