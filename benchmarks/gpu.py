"""HMT against the plain backbone on a GPU: training and reading throughput, peak memory, MFU.

The setting of issue 11: SmolLM2-135M's architecture (random weights: speed does not depend
on them, and no GGUF is needed), windows of S = 8 segments x L = 256 tokens, HMT with
j = 128, k = 32, N = 300, ``memory_compression="embedding"``; bf16 autocast; every parameter
training, fused AdamW (on CUDA). For each number of windows per step:

  train  one optimizer step on B windows.
         HMT:   model(ids, labels=ids, memory_state=new, return_logits=False).loss.backward()
                (full BPTT through the S segments; --checkpoint-segments to recompute them,
                which the run also falls back to where full BPTT runs out of memory)
         plain: the backbone on the same B x S disjoint L-token segments in one batched call,
                backbone(input_ids=(B*S, L)).logits and the same float32 cross-entropy
  read   the same scoring without autograd (torch.inference_mode): HMT with
         return_logits=False, the plain backbone's logits + cross-entropy.

Reported per row: tokens/s (tokens of the windows, i.e. B x S x L per step), the ratio of
HMT's time per token to the plain backbone's, peak CUDA memory (max_memory_allocated), and
MFU: model FLOPs of the tokens processed (6 x non-embedding+head parameters per token for
training, 2 x for reading, plus attention) over the GPU's peak bf16 rate (``--peak-tflops``,
989 for an H200's dense bf16). HMT's MFU counts the same useful tokens as the plain
backbone's, so it is lower by the overhead HMT adds. A configuration that runs out of
memory is reported as such.

The trainer part (``--parts trainer``) runs ``hmt.train.train`` itself (data loading,
optimizer, logging) on the shipped GPU recipe's stage 2 (``recipes/smollm2-gpu-lora.yaml``:
LoRA r = 8, 8 x 256-token windows, batch 16, bf16) over synthetic windows, and reports the
trainer's own tokens/s.

    python benchmarks/gpu.py                         # the issue's table, ~3 min on one H200
    python benchmarks/gpu.py --batches 16 32 --parts train
    python benchmarks/gpu.py --tiny --device cpu     # smoke run of the script on a CPU (seconds)
    python benchmarks/gpu.py --json gpu.json --partial   # the JSON rewritten after every row (a run cut
                                                         # short by a time limit leaves the rows it measured)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from _common import (add_json_argument, check_json, device_name, environment, make_parser, non_negative_int, pick_device,
                     positive_int, synchronize, table, write_json)
from hmt.arguments import positive_float, run


def smollm2_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def make_backbone(args, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(smollm2_config(args.tiny), dtype=torch.float32).to(device)


def hmt_config(args):
    from hmt import HMTConfig

    return HMTConfig(segment_length=args.segment_length, representation_length=args.representation_length,
                     sensory_memory_size=args.sensory, num_memory_embeddings=args.num_memory,
                     memory_compression="embedding")


def flops_per_token(backbone, train: bool, context: int) -> float:
    """Model FLOPs per token: 2 (forward) or 6 (training) x the parameters a token's compute
    touches (every parameter but the input-embedding table; a tied head counts once as the
    head), plus attention over ``context`` positions (2 x layers x width x context per pass)."""
    cfg = backbone.config
    params = sum(p.numel() for p in backbone.parameters())
    if not cfg.tie_word_embeddings:
        params -= backbone.get_input_embeddings().weight.numel()
    attention = 2 * cfg.num_hidden_layers * cfg.hidden_size * context
    return (6 if train else 2) * params + (3 if train else 1) * attention


def plain_step(backbone, ids, train: bool):
    """The plain backbone over ``ids (B*S, L)``: logits, then the float32 next-token loss."""
    logits = backbone(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if train:
        loss.backward()
    return loss


def hmt_step(model, ids, train: bool, checkpoint_segments: bool):
    out = model(ids, labels=ids, memory_state=model.new_memory(ids.shape[0]), return_logits=False,
                checkpoint_segments=checkpoint_segments)
    if train:
        out.loss.backward()
    return out.loss


def measure(fn, device, warmup: int, repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn()`` and the peak CUDA memory it reached."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return sorted(times)[len(times) // 2], peak


def run_pair(args, device, B: int, train: bool) -> dict:
    """HMT and the plain backbone on B windows, training or reading: one row of the table."""
    from hmt import HMT

    S, L = args.segments, args.segment_length
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None
    generator = torch.Generator().manual_seed(B)
    backbone = make_backbone(args, device)
    vocab = backbone.config.vocab_size
    ids = torch.randint(3, vocab, (B, S * L), generator=generator).to(device)
    row = {"windows": B, "mode": "train" if train else "read", "tokens_per_step": B * S * L}
    model = HMT(backbone, hmt_config(args)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda") if train else None

    def wrap(step):
        def fn():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if train:
                    step()
                else:
                    with torch.inference_mode():
                        step()
            if train:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return fn

    checkpointing = [args.checkpoint_segments]
    variants = {
        "plain": wrap(lambda: plain_step(backbone, ids.view(B * S, L), train)),
        "hmt": wrap(lambda: hmt_step(model, ids, train, checkpointing[0])),
    }
    for name, fn in variants.items():
        try:
            try:
                seconds, peak = measure(fn, device, args.warmup, args.repeats)
            except torch.OutOfMemoryError:
                if name != "hmt" or not train or checkpointing[0]:
                    raise
                # Full BPTT through S segments does not fit: recompute each segment in backward.
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                checkpointing[0] = True
                seconds, peak = measure(fn, device, args.warmup, args.repeats)
            row["hmt_checkpoint_segments"] = checkpointing[0]
            row[f"{name}_tokens_per_s"] = B * S * L / seconds
            row[f"{name}_seconds"] = seconds
            row[f"{name}_peak_bytes"] = peak
            context = L if name == "plain" else args.sensory + L + 2
            row[f"{name}_mfu"] = (flops_per_token(backbone, train, context) * B * S * L / seconds) / (args.peak_tflops * 1e12)
        except torch.OutOfMemoryError:
            row[f"{name}_tokens_per_s"] = None
            row[f"{name}_error"] = "out of memory"
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if row.get("plain_tokens_per_s") and row.get("hmt_tokens_per_s"):
        row["ratio"] = row["plain_tokens_per_s"] / row["hmt_tokens_per_s"]
    del model, backbone, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_trainer(args, device) -> dict:
    """``hmt.train.train`` on the GPU recipe's stage 2 over synthetic windows: the trainer's tokens/s."""
    import tempfile
    from pathlib import Path

    from hmt.train import load_recipe, train

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-gpu-lora.yaml"
    (_, config), = [(n, c) for n, c in load_recipe(recipe) if n == "stage2"]
    backbone = make_backbone(args, device)
    vocab = backbone.config.vocab_size
    window = config.segments_per_window * config.hmt_config().segment_length
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range((args.trainer_batch_size or config.batch_size) * (args.trainer_steps + 1)):
        ids = torch.randint(3, vocab, (window,), generator=generator)
        items.append({"input_ids": ids, "labels": ids.clone()})
    with tempfile.TemporaryDirectory() as out:
        config.init_from, config.output_dir, config.steps = None, out, args.trainer_steps
        if args.trainer_batch_size:
            config.batch_size = args.trainer_batch_size
        config.eval_every = config.save_every = args.trainer_steps + 1
        config.log_every, config.progress = 1, False
        if device.type != "cuda":
            config.precision = "fp32"
        started = time.perf_counter()
        result = train(config, backbone=backbone, tokenizer=None, train_data=items, eval_data=None, resume=False)
        wall = time.perf_counter() - started
    history = result.history
    skip = min(args.warmup, len(history) - 1)
    # tokens/s over the steps after the warm-up ones, from the trainer's own running figure
    first, last = history[skip - 1] if skip else None, history[-1]
    tokens = config.batch_size * window * (len(history) - skip)
    seconds = last["elapsed_s"] - (first["elapsed_s"] if first else 0.0)
    return {"recipe": str(recipe.name), "stage": "stage2", "steps": len(history), "batch_size": config.batch_size,
            "window": window, "trainable": config.trainable, "precision": config.precision,
            "tokens_per_s": tokens / seconds, "wall_s": wall, "trainer_reported_tokens_per_s": last["tokens_per_s"]}


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[16, 32, 64], help="windows per step")
    parser.add_argument("--parts", nargs="+", default=["train", "read", "trainer"], choices=["train", "read", "trainer"])
    parser.add_argument("--segments", type=positive_int, default=8, help="S: segments per window")
    parser.add_argument("-L", "--segment-length", type=positive_int, default=256)
    parser.add_argument("-j", "--representation-length", type=positive_int, default=128)
    parser.add_argument("-k", "--sensory", type=non_negative_int, default=32)
    parser.add_argument("-N", "--num-memory", type=positive_int, default=300)
    parser.add_argument("--checkpoint-segments", action="store_true", help="HMT recomputes each segment in backward")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--trainer-steps", type=positive_int, default=12)
    parser.add_argument("--trainer-batch-size", type=positive_int, default=None,
                        help="windows per step of the trainer part (default: the recipe's, 16)")
    parser.add_argument("--peak-tflops", type=positive_float, default=989.0, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of SmolLM2's size (smoke runs)")
    parser.add_argument("--device", type=device_name, default="auto")
    parser.add_argument("--partial", action="store_true",
                        help="with --json: write the file after every row too (\"complete\": false until the end)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    check_json(parser, args)
    device = pick_device(args.device)
    if args.tiny:
        args.segment_length, args.representation_length, args.sensory, args.num_memory = 32, 16, 4, 20
    started = time.perf_counter()
    rows = []

    def payload(trainer, complete: bool) -> dict:
        return {"benchmark": "gpu", "environment": environment(device), "settings": vars(args), "rows": rows,
                "trainer": trainer, "wall_s": time.perf_counter() - started, "complete": complete}

    for part in [p for p in args.parts if p != "trainer"]:
        for B in args.batches:
            rows.append(run_pair(args, device, B, train=part == "train"))
            print(rows[-1], flush=True)
            if args.partial:
                write_json(args.json, payload(None, complete=False))
    headers = ["mode", "windows", "plain tok/s", "HMT tok/s", "ratio", "plain peak GiB", "HMT peak GiB", "plain MFU %", "HMT MFU %"]
    gib = lambda v: v / 2**30 if v else float("nan")  # noqa: E731
    print(table(headers, [[r["mode"], r["windows"], r.get("plain_tokens_per_s") or "OOM", r.get("hmt_tokens_per_s") or "OOM",
                           r.get("ratio", float("nan")), gib(r.get("plain_peak_bytes")), gib(r.get("hmt_peak_bytes")),
                           100 * r.get("plain_mfu", float("nan")), 100 * r.get("hmt_mfu", float("nan"))] for r in rows]))
    trainer = None
    if "trainer" in args.parts:
        trainer = run_trainer(args, device)
        print(f"\nhmt train, {trainer['recipe']} stage 2 ({trainer['trainable']}, batch {trainer['batch_size']} x "
              f"{trainer['window']} tokens, {trainer['precision']}): {trainer['tokens_per_s']:,.0f} tokens/s")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_json(args.json, payload(trainer, complete=True))


if __name__ == "__main__":
    sys.exit(run(main))
