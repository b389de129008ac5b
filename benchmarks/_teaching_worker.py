"""One variant of ``teaching_cost.py`` in its own process (accelerate fixes the precision once per
process), or in several under ``accelerate launch`` (a ``_ddp`` variant; the first process prints
the figures, which count every process's examples); with ``--draw N``, only the run's examples.
Run by ``teaching_cost.py``, not by hand.

It imports only what ``hmt`` has had since issue 17 was filed (``load_backbone``,
``passkey.task_examples``, ``QADataset``, ``hmt.train``'s ``load_recipe`` and ``train``), so that
``teaching_cost.py --baseline-source DIR`` can time another checkout's trainer on the same examples: its
``src/`` goes first on the path and its own recipe file is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("variant")
parser.add_argument("--source", required=True, help="the checkout whose src/ and recipe are measured")
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--warmup", type=int, required=True)
parser.add_argument("--batch-size", type=int, required=True, help="examples per micro-batch of each process")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step of each process")
parser.add_argument("--distances", type=int, nargs=2, required=True)
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--tiny", action="store_true")
parser.add_argument("--examples", required=True, help="JSONL: read the examples from it, or write them there if it is new")
parser.add_argument("--draw", type=int, default=None, metavar="N", help="only draw N examples into --examples and stop")
args = parser.parse_args()
sys.path.insert(0, os.path.join(os.path.abspath(args.source), "src"))

import torch  # noqa: E402

import hmt  # noqa: E402
from hmt import passkey  # noqa: E402
from hmt.data import QADataset, QAExample  # noqa: E402
from hmt.train import load_recipe, train  # noqa: E402

RECIPE = os.path.join("recipes", "smollm2-passkey-curriculum.yaml")


def variant_config(base, name: str, steps: int, out_dir: str, batch_size: int, grad_accum: int):
    """The near stage as ``name`` runs it: no LM windows, no evaluation, no checkpoints."""
    changes = dict(steps=steps, batch_size=batch_size, grad_accum=grad_accum, output_dir=os.path.join(out_dir, name),
                   log_every=1, eval_every=10**6,
                   save_every=10**6, progress=False, mix_fraction=0.0, mix_data=None,
                   gradient_checkpointing=name.endswith("_ckpt"), precision="bf16" if "_bf16" in name else "fp32")
    if name.startswith("plain"):
        changes.update(use_memory=False, retrieval_loss_weight=0.0)
    if "sparse" in name:
        changes["sparse_bptt"] = True  # only on a trainer that has it: the others run without the field
    return dataclasses.replace(base, **changes)


def world_size() -> int:
    """How many processes run this variant (``accelerate launch`` sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_batch(config) -> int:
    return config.batch_size * config.grad_accum * world_size()


def run_variant(config, backbone, tokenizer, data, warmup: int) -> dict:
    backbone.zero_grad(set_to_none=True)
    start = time.perf_counter()
    result = train(config, backbone=backbone, tokenizer=tokenizer, train_data=data, eval_data=None, resume=False)
    wall = time.perf_counter() - start
    timed = [r for r in result.history if "elapsed_s" in r]
    first, last = timed[warmup - 1], timed[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    examples = (last["step"] - first["step"]) * global_batch(config)
    tokens = sum(int(data[i]["input_ids"].shape[0]) for i in range(len(data)))  # read once per example
    mean_tokens = tokens / len(data)
    return {"examples_per_hour": examples / seconds * 3600, "seconds_per_example": seconds / examples,
            "tokens_per_s": examples * mean_tokens / seconds, "mean_tokens_per_example": mean_tokens,
            "final_loss": result.history[-1]["loss"], "losses": [r["loss"] for r in timed], "wall_s": wall,
            "steps_timed": last["step"] - first["step"]}


def worker() -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    (stage, base), *_ = load_recipe(os.path.join(args.source, RECIPE))
    if args.tiny:
        from hmt.recall import tiny_llama

        backbone = tiny_llama(vocab_size=256, hidden_size=64, layers=2, max_positions=1024)
        tokenizer = _byte_tokenizer()
        base = dataclasses.replace(base, init_from=None, hmt=dict(base.hmt, segment_length=64, representation_length=32,
                                                                  sensory_memory_size=8, memory_compression=False))
    else:
        backbone, tokenizer = hmt.load_backbone(base.backbone)
    if args.draw:
        _examples(tokenizer, args.draw)
        return {}
    with tempfile.TemporaryDirectory() as out_dir:
        config = variant_config(base, args.variant, args.steps, out_dir, args.batch_size, args.grad_accum)
        examples = _examples(tokenizer, args.steps * global_batch(config))
        data = QADataset(examples, tokenizer, progress=False, **base.qa_options)
        row = run_variant(config, backbone, tokenizer, data, args.warmup)
    return dict(row, threads=torch.get_num_threads(), processes=world_size(), global_batch=global_batch(config),
                init_from=base.init_from)


FIELDS = ("context", "prompt", "answer", "name", "evidence")  # what QAExample has had since 7424c19


def _examples(tokenizer, count: int) -> list:
    """The run's passkey examples: drawn by the first worker (with its checkout's ``task_examples``)
    and read back by every later one, so that another checkout's trainer reads the same texts."""
    if os.path.exists(args.examples):
        with open(args.examples) as f:
            return [QAExample(**json.loads(line)) for line in f]
    examples = passkey.task_examples(tokenizer, count, *args.distances, seed=987654)
    with open(args.examples, "w") as f:
        for example in examples:
            f.write(json.dumps({k: getattr(example, k) for k in FIELDS}) + "\n")
    return examples


def _byte_tokenizer():
    """A tokenizer over single characters (ids < 256), for --tiny."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


if __name__ == "__main__":
    result = worker()
    if int(os.environ.get("RANK", "0")) == 0:  # one line: two processes printing at once can interleave
        print("RESULT " + json.dumps(result), flush=True)
