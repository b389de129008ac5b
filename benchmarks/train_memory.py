"""Peak memory of one HMT training step against unroll depth, with and without per-segment checkpointing.

One training step, as the trainer takes it (``hmt.train.build_model``: LoRA r=8, alpha=32 on
all linear layers by default, HMT's own parameters trainable, the base weights frozen):

    out = model(ids, labels=ids, memory_state=model.new_memory(B), return_logits=False,
                checkpoint_segments=FLAG, detach_every=None)
    out.loss.backward()

over S segments of L tokens of real text (Python standard-library source), i.e. full BPTT
through all S segments (the paper unrolls 15). Every (S, FLAG) runs in its own fresh
subprocess, so its peak is its own. Per run:

  after load     RSS (VmRSS) after loading the model, reading every weight once (the
                 safetensors are memory-mapped) and one warm-up step (forward + backward on
                 a few tokens, same FLAG; gradients then dropped, as zero_grad(set_to_none))
  step peak      peak RSS during the measured step: the kernel's high-water mark
                 (ru_maxrss / VmHWM) is reset after loading through /proc/self/clear_refs
  working        step peak - after load: activations kept for backward, the recomputation,
                 the gradients. This is the figure that grows with S.
  peak RSS       the whole process's ru_maxrss (loading included)
  CUDA           torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
                 memory_allocated after load (working), and the total

The workers run with MALLOC_MMAP_THRESHOLD_=65536 (glibc) unless --keep-malloc: large
blocks are then always mmap'ed and given back to the system when freed, so RSS follows the
memory actually in use instead of what the allocator keeps cached.

Both modes must give the same loss and the same gradient (norm printed): checkpointing
recomputes the very same segment in backward.

    python benchmarks/train_memory.py                         # default (S = 1 2 4 8 15, L=128), ~10 min on a busy 2-core CPU
    python benchmarks/train_memory.py --quick                 # smoke run (S = 1 2, L=32)
    python benchmarks/train_memory.py --json train_mem.json --segment-length 256 --depths 1 4 15
    python benchmarks/train_memory.py --trainable full        # the whole backbone trains too
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024

# Quiet, non-spinning OpenMP threads: the CPU may be shared. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from hmt.arguments import run  # noqa: E402
from _common import (  # noqa: E402
    MemoryWatch, add_json_argument, add_model_arguments, check_json, make_parser, positive_int, add_worker_arguments, document_ids, environment, model_argv, parse_dtype,
    pick_device, print_result, run_workers, synchronize, table, worker_env, write_json,
)


# --------------------------------------------------------------------------- worker
def train_step(model, ids: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    out = model(ids, labels=ids, memory_state=model.new_memory(ids.shape[0]), return_logits=False,
                checkpoint_segments=checkpoint, detach_every=None)
    out.loss.backward()
    return out.loss.detach()


def grad_norm(params) -> float:
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    import hmt
    from hmt.train import TrainConfig, build_model

    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype)
    backbone, _ = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    hmt_fields = dict(segment_length=args.segment_length, sensory_memory_size=args.sensory,
                      num_memory_embeddings=args.num_memory)
    if args.representation_length:
        hmt_fields["representation_length"] = args.representation_length
    config = TrainConfig(backbone=args.backbone, hmt=hmt_fields, trainable=args.trainable, lora_r=args.lora_r,
                         lora_alpha=args.lora_alpha, progress=False)
    torch.manual_seed(0)  # HMT's and LoRA's initialisation: both modes train the very same model
    model = build_model(config, backbone).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.load(args.ids_file)[:, : args.depth * args.segment_length].contiguous().to(device)
    ids = ids.expand(args.batch_size, -1).contiguous()
    T = ids.shape[1]

    # Touch every weight (memory-mapped safetensors become resident only when read) and take
    # one small step with the same flag (lazy library state, autograd and peft set-up), so
    # "after load" holds the whole model and the working memory is the step's own.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    warm = ids[:, : min(T, max(8, args.segment_length // 4))]
    train_step(model, warm, args.checkpoint)
    model.zero_grad(set_to_none=True)
    del warm
    watch = MemoryWatch(device)
    watch.loaded()

    start = time.perf_counter()
    loss = train_step(model, ids, args.checkpoint)
    synchronize(device)
    seconds = time.perf_counter() - start

    memory = watch.figures("step")
    return {
        "depth": args.depth,
        "checkpoint_segments": args.checkpoint,
        "tokens": T,
        "batch_size": args.batch_size,
        "seconds": seconds,
        "loss": float(loss),
        "grad_norm": grad_norm(params),
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_bytes": max(watch.load_peak, memory["step_peak_rss_bytes"]),
        **memory,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


# --------------------------------------------------------------------------- parent
def parse_args(argv=None):
    p = make_parser(__doc__)
    add_model_arguments(p, segment_length=128, representation_length=None,
                        threads_help="torch.set_num_threads in each worker")
    p.add_argument("--depths", type=positive_int, nargs="+", default=[1, 2, 4, 8, 15], help="unroll depths S (segments)")
    p.add_argument("--batch-size", "-B", type=positive_int, default=1)
    p.add_argument("--trainable", default="lora", choices=["memory", "lora", "full"],
                   help="what trains besides HMT's own parameters (as TrainConfig.trainable)")
    p.add_argument("--lora-r", type=positive_int, default=8)
    p.add_argument("--lora-alpha", type=positive_int, default=32)
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="checkpoint_segments modes to run")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="workers at once (peak RSS is per process, so side-by-side runs do not mix their "
                   "memory figures, but their seconds then share the CPU). Default 1")
    p.add_argument("--keep-malloc", action="store_true",
                   help="do not set MALLOC_MMAP_THRESHOLD_ in the workers (RSS then includes allocator caching)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: S = 1 2, L = 32, k = 8")
    add_json_argument(p)
    p.add_argument("--replot", metavar="PATH", help="print the tables again from a JSON file this script wrote; run nothing")
    # internal: one measurement in this process
    add_worker_arguments(p)
    p.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.json != args.replot or not args.replot:
        check_json(p, args)
    if args.replot and not os.path.isfile(args.replot):
        p.error(f"argument --replot: {args.replot} does not exist")
    if args.quick:
        args.depths, args.segment_length, args.sensory = [1, 2], 32, 8
    return args


def worker_command(args, run: tuple[int, bool], ids_file: str) -> list[str]:
    depth, checkpoint = run
    cmd = [sys.executable, os.path.join(HERE, "train_memory.py"), "--worker", "--depth", str(depth),
           "--ids-file", ids_file, *model_argv(args), "-B", str(args.batch_size), "--trainable", args.trainable,
           "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    return cmd + ["--checkpoint"] if checkpoint else cmd


def run_name(run: tuple[int, bool]) -> str:
    depth, checkpoint = run
    return f"S={depth:>2} checkpoint={'on ' if checkpoint else 'off'}"


def report(run: tuple[int, bool], r: dict, seconds: float) -> None:
    line = (f"  {run_name(run)}: {r['tokens']:>5} tokens, working {r['working_bytes'] / MiB:8.1f} MiB, "
            f"peak RSS {r['peak_rss_bytes'] / MiB:8.1f} MiB, {r['seconds']:6.1f} s, loss {r['loss']:.6f}, "
            f"|grad| {r['grad_norm']:.6g}")
    if "cuda_max_allocated_bytes" in r:
        line += f", CUDA working {r['cuda_working_bytes'] / MiB:.1f} MiB (max allocated {r['cuda_max_allocated_bytes'] / MiB:.1f})"
    print(line, flush=True)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print_result(worker(args))
        return {"ok": True}

    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        for key in ("depths", "segment_length", "sensory", "num_memory", "batch_size", "trainable", "modes", "dtype"):
            setattr(args, key, saved["args"][key])
        print(f"HMT training step, L={args.segment_length} k={args.sensory} N={args.num_memory} B={args.batch_size}, "
              f"trainable={args.trainable}; {saved['environment'].get('device')}, {args.dtype} (from {args.replot})")
        results = {(r["depth"], r["checkpoint_segments"]): r for r in saved["results"]}
        flags = [m == "on" for m in args.modes]
        runs = [(d, f) for d in sorted(set(args.depths)) for f in flags]
        if args.json == args.replot:
            args.json = None  # do not overwrite the measurement with a re-render
        return report_and_save(args, results, runs, flags, torch.device(saved["environment"].get("device", "cpu")),
                               saved["environment"])

    torch.set_num_threads(args.threads)
    import hmt

    device = pick_device(args.device)
    _, tokenizer = hmt.load_backbone(args.backbone)
    longest = max(args.depths) * args.segment_length
    ids = document_ids(tokenizer, longest)
    flags = [m == "on" for m in args.modes]
    runs = [(d, f) for d in sorted(set(args.depths)) for f in flags]
    print(f"HMT training step, L={args.segment_length} k={args.sensory} N={args.num_memory} B={args.batch_size}, "
          f"trainable={args.trainable}; device {device}, {args.dtype}; one subprocess per run, {args.jobs} at a time, "
          f"{args.threads} thread(s) each; text: Python stdlib source", flush=True)

    order = sorted(runs, key=lambda r: -r[0]) if args.jobs > 1 else list(runs)  # parallel: longest first
    env = worker_env(OMP_NUM_THREADS=args.threads, OMP_WAIT_POLICY="PASSIVE",
                     MALLOC_MMAP_THRESHOLD_=None if args.keep_malloc else 65536)
    results = run_workers(order, lambda run, ids_file: worker_command(args, run, ids_file), ids, jobs=args.jobs,
                          env=env, label=run_name, done=report)
    results = {run: {"depth": run[0], "checkpoint_segments": run[1], **r} if "error" in r else r
               for run, r in results.items()}

    report_and_save(args, results, runs, flags, device)


def report_and_save(args, results: dict, runs: list, flags: list, device, env: dict | None = None) -> dict:
    ok = {k: r for k, r in results.items() if "error" not in r}
    cuda = any("cuda_max_allocated_bytes" in r for r in ok.values())
    mem_key = "cuda_working_bytes" if cuda else "working_bytes"
    total_key = "cuda_max_allocated_bytes" if cuda else "peak_rss_bytes"
    what = "CUDA max allocated - after load" if cuda else "peak RSS of the step - RSS after load"

    def get(depth, flag, key):
        r = ok.get((depth, flag))
        return r[key] if r is not None and key in r else float("nan")

    rows, checks = [], []
    for depth in sorted(set(args.depths)):
        off_m, on_m = get(depth, False, mem_key) / MiB, get(depth, True, mem_key) / MiB
        off_loss, on_loss = get(depth, False, "loss"), get(depth, True, "loss")
        off_g, on_g = get(depth, False, "grad_norm"), get(depth, True, "grad_norm")
        tokens = next((r["tokens"] for (d, _), r in ok.items() if d == depth), depth * args.segment_length * args.batch_size)
        rows.append([depth, tokens, off_m, on_m, off_m / on_m if on_m > 0 else float("nan"),
                     get(depth, False, total_key) / MiB, get(depth, True, total_key) / MiB,
                     get(depth, False, "seconds"), get(depth, True, "seconds")])
        checks.append([depth, off_loss, on_loss, abs(off_loss - on_loss), off_g, on_g,
                       abs(off_g - on_g) / max(abs(off_g), 1e-30)])
    fmt = lambda c: [c[0], f"{c[1]:.6f}", f"{c[2]:.6f}", f"{c[3]:.1e}", f"{c[4]:.6g}", f"{c[5]:.6g}", f"{c[6]:.1e}"]
    print(f"\nPeak memory of one training step (forward + backward through all S segments); working = {what}")
    print(table(["S (segments)", "tokens", "working MiB off", "working MiB on", "ratio off/on",
                 "total MiB off", "total MiB on", "s/step off", "s/step on"], rows))

    # Segment 1 reads an empty cache, so it skips the retrieval pass (representation encoder)
    # that every later segment runs: the slope over S >= 2 is the steady per-segment cost.
    growth = {}
    for flag in flags:
        pts = [(d, r[mem_key] / MiB) for (d, f), r in sorted(ok.items()) if f == flag]
        later = [p for p in pts if p[0] >= 2]
        growth["on" if flag else "off"] = {
            "mib_per_segment_fit": slope(pts),
            "mib_per_segment_fit_from_2": slope(later),
            "mib_per_segment_endpoints": (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
            if len(pts) > 1 and pts[-1][0] != pts[0][0] else float("nan"),
        }
    print("\nGrowth of the working memory per extra segment (least-squares slope against S)")
    print(table(["checkpoint", "MiB/segment, S >= 2", "MiB/segment, all S", "first -> last S"],
                [[mode, g["mib_per_segment_fit_from_2"], g["mib_per_segment_fit"], g["mib_per_segment_endpoints"]]
                 for mode, g in growth.items()]))

    print("\nSame step both ways: loss and gradient norm")
    print(table(["S", "loss off", "loss on", "|diff|", "|grad| off", "|grad| on", "rel diff"], [fmt(c) for c in checks]))
    diffs = [c[3] for c in checks if c[3] == c[3]]
    grad_diffs = [c[6] for c in checks if c[6] == c[6]]
    same = bool(diffs) and max(diffs) <= 1e-4 and max(grad_diffs) <= 1e-3
    if diffs:
        print(f"  max |loss diff| {max(diffs):.2e}, max relative |grad| diff {max(grad_diffs):.2e}: "
              f"{'same' if same else 'DIFFERENT'}")

    payload = {"args": vars(args), "environment": env or environment(device), "memory_measure": what,
               "results": [results[r] for r in runs], "growth_mib_per_segment": growth, "same_loss_and_grad": same}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    sys.exit(run(main))
