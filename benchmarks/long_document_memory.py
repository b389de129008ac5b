"""Peak memory of scoring a long document with HMT, against the plain backbone's full attention.

HMT scores the whole document (labels=input_ids, return_logits=False, torch.no_grad),
L=256, j=128, k=32, N=300 on SmolLM2-135M, at 4k, 8k, 16k and 32k tokens of real text
(Python standard-library source). Each (variant, length) runs in its own fresh
subprocess, so its peak RSS is its own. Per run:

  peak RSS          resource.getrusage(RUSAGE_SELF).ru_maxrss of the whole process
                    (model loading included)
  after load        RSS (VmRSS) after loading the model and the token ids, reading every
                    weight once (safetensors are memory-mapped: pages become resident
                    only when first read) and running the same call on 8 tokens
  scoring peak      peak RSS while scoring: the kernel's high-water mark is reset after
                    loading (/proc/self/clear_refs), so loading transients do not hide it
  working memory    scoring peak - after load
  CUDA              torch.cuda.max_memory_allocated (and minus the allocation after load)

For context, the plain backbone over the WHOLE sequence with full attention (as far as
its position limit allows; 8k for SmolLM2), two ways:

  plain_full_hf       backbone(input_ids, labels=input_ids): the usual call, full logits
  plain_full_chunked  decoder over the whole sequence once, then LM head + loss per
                      L-token chunk (what HMT does with its head): isolates attention
                      and activations from the (T, vocab) logits

With --segment-baseline, also model(ids, labels=ids, return_logits=False, use_memory=False)
(plain_segments) at every HMT length: the same segment loop without memory, as a control.

    python benchmarks/long_document_memory.py            # default, ~4-5 min on 2 free CPU cores
    python benchmarks/long_document_memory.py --quick    # smoke run
    python benchmarks/long_document_memory.py --json mem.json --lengths 4096 32768
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from hmt.arguments import run
from _common import (MemoryWatch, add_json_argument, add_model_arguments, check_json, make_parser, non_negative_int, positive_int, add_worker_arguments, document_ids, environment, hmt_from_args,
                     model_argv, parse_dtype, pick_device, print_result, run_workers, synchronize, table, worker_env,
                     write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
IGNORE_INDEX = -100
MiB = 1024 * 1024


# --------------------------------------------------------------------------- worker
def run_variant(variant: str, model, backbone, bb, config, ids: torch.Tensor) -> tuple[float, int]:
    """Score ``ids``; return the summed NLL and the number of tokens scored."""
    T = ids.shape[1]
    if variant == "hmt":
        out = model(ids, labels=ids, return_logits=False, memory_state=model.new_memory(1))
        return float(out.nll_sum.sum()), int(out.num_tokens.sum())
    if variant == "plain_segments":  # the paper's baseline: plain backbone on the same disjoint L segments
        out = model(ids, labels=ids, return_logits=False, use_memory=False)
        return float(out.nll_sum.sum()), int(out.num_tokens.sum())
    if variant == "plain_full_hf":
        out = backbone(input_ids=ids, labels=ids, use_cache=False)
        return float(out.loss) * (T - 1), T - 1
    if variant == "plain_full_chunked":
        hidden = bb.decoder_stack(backbone)(input_ids=ids, use_cache=False).last_hidden_state
        targets = torch.cat([ids[:, 1:], ids.new_full((1, 1), IGNORE_INDEX)], dim=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        L = config.segment_length
        for s in range(0, T, L):
            logits = bb.lm_logits(backbone, hidden[:, s : s + L])
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets[:, s : s + L].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return float(total), T - 1
    raise SystemExit(f"unknown variant {variant}")


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    import hmt
    from hmt import backbone as bb

    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype)
    backbone, _ = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    torch.manual_seed(0)  # W_q, W_k are initialised from the global RNG
    model = hmt_from_args(backbone, args)
    config = model.config
    ids = torch.load(args.ids_file)[:, : args.length].contiguous().to(device)
    T = ids.shape[1]
    # The weights are memory-mapped from safetensors and only become resident when first
    # read: touch them all, and run the variant once on 8 tokens (lazy library state), so
    # that "after load" holds the whole model and the working memory is the scoring's own.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        run_variant(args.variant, model, backbone, bb, config, ids[:, :8])
    watch = MemoryWatch(device)
    watch.loaded()

    start = time.perf_counter()
    with torch.no_grad():
        nll, n = run_variant(args.variant, model, backbone, bb, config, ids)
    synchronize(device)
    seconds = time.perf_counter() - start

    memory = watch.figures("scoring")
    return {
        "variant": args.variant,
        "tokens": T,
        "seconds": seconds,
        "nll_per_token": nll / max(n, 1),
        "peak_rss_bytes": max(watch.load_peak, memory["scoring_peak_rss_bytes"]),
        **memory,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


# --------------------------------------------------------------------------- parent
def parse_args(argv=None):
    p = make_parser(__doc__)
    add_model_arguments(p, threads_help="torch.set_num_threads in each worker (default 1: memory does not depend on "
                        "it, and one thread per worker is steady on a shared CPU)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384, 32768], help="HMT document lengths")
    p.add_argument("--plain-lengths", type=positive_int, nargs="*", default=[4096, 8192],
                   help="full-attention plain-backbone lengths (capped at the backbone's position limit)")
    p.add_argument("--plain-variants", nargs="*", default=["plain_full_hf", "plain_full_chunked"],
                   choices=["plain_full_hf", "plain_full_chunked"])
    p.add_argument("--segment-baseline", action="store_true",
                   help="also run model(..., use_memory=False) (plain backbone on the same disjoint L segments, "
                   "no memory) at every HMT length: a control with the same segment loop but no growing cache")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="workers run at once, each its own process (peak RSS is per process, so running "
                   "them side by side does not mix their figures). Default: cores // threads on CPU, 1 on CUDA")
    p.add_argument("--malloc-mmap-threshold", type=non_negative_int, default=None, metavar="BYTES",
                   help="run the workers with MALLOC_MMAP_THRESHOLD_=BYTES (glibc): blocks above it are "
                   "mmapped and handed back on free, so freed heap memory is not retained (diagnosis)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: HMT at 512 and 1024 tokens, plain at 512")
    add_json_argument(p)
    # internal: one measurement in this process
    add_worker_arguments(p)
    p.add_argument("--variant", default="hmt", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_json(p, args)
    if args.quick:
        args.lengths, args.plain_lengths = [512, 1024], [512]
    return args


def worker_command(args, run: tuple[str, int], ids_file: str) -> list[str]:
    variant, length = run
    return [sys.executable, os.path.join(HERE, "long_document_memory.py"), "--worker", "--variant", variant,
            "--length", str(length), "--ids-file", ids_file, *model_argv(args)]


def report(run: tuple[str, int], result: dict, seconds: float) -> None:
    variant, length = run
    line = (f"  {variant:>18} @ {length:>6}: peak RSS {result['peak_rss_bytes'] / MiB:8.1f} MiB, "
            f"working {result['working_bytes'] / MiB:8.1f} MiB, {result['seconds']:.1f}s")
    if "cuda_max_allocated_bytes" in result:
        line += f", CUDA max allocated {result['cuda_max_allocated_bytes'] / MiB:.1f} MiB"
    print(line, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print_result(worker(args))
        return {"ok": True}

    import hmt
    from hmt import backbone as bb

    device = pick_device(args.device)
    backbone, tokenizer = hmt.load_backbone(args.backbone)  # for the tokenizer and the position limit
    limit = bb.max_positions(backbone)
    del backbone
    longest = max(args.lengths + args.plain_lengths)
    ids = document_ids(tokenizer, longest)
    plain_lengths = [n for n in args.plain_lengths if limit is None or n <= limit]
    skipped = [n for n in args.plain_lengths if n not in plain_lengths]

    print(f"HMT L={args.segment_length} j={args.representation_length} k={args.sensory} N={args.num_memory}; "
          f"device {device}, {args.dtype}; one subprocess per run; document: {longest} tokens of Python stdlib source")
    if skipped:
        print(f"  plain full attention skipped at {skipped}: beyond the backbone's {limit} positions")
    jobs = args.jobs or (1 if device.type == "cuda" else max(1, (os.cpu_count() or 1) // max(args.threads or 1, 1)))
    runs = [("hmt", n) for n in args.lengths]
    if args.segment_baseline:
        runs += [("plain_segments", n) for n in args.lengths]
    runs += [(v, n) for v in args.plain_variants for n in plain_lengths]
    if args.malloc_mmap_threshold:
        print(f"  workers run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
    print(f"  {len(runs)} runs, {jobs} at a time, {args.threads or 'default'} thread(s) each "
          "(the seconds below are indicative only when runs share the CPU)")
    cost = {"hmt": 1.0, "plain_segments": 0.7}  # longest first, so that parallel workers finish together
    order = sorted(runs, key=lambda r: -r[1] * cost.get(r[0], 0.6))
    results = run_workers(order, lambda run, ids_file: worker_command(args, run, ids_file), ids, jobs=jobs,
                          env=worker_env(MALLOC_MMAP_THRESHOLD_=args.malloc_mmap_threshold or None),
                          label=lambda run: f"{run[0]} @ {run[1]}", done=report)
    results = [{"variant": r[0], "tokens": r[1], **results[r]} if "error" in results[r] else results[r] for r in runs]

    ok = [r for r in results if "error" not in r]
    cuda = any("cuda_max_allocated_bytes" in r for r in ok)
    headers = ["variant", "tokens", "peak RSS MiB", "after load MiB", "scoring peak MiB", "working MiB", "s", "tokens/s", "NLL/token"]
    if cuda:
        headers += ["CUDA max alloc MiB", "CUDA working MiB"]
    rows = []
    for r in ok:
        row = [r["variant"], r["tokens"], r["peak_rss_bytes"] / MiB, r["rss_after_load_bytes"] / MiB,
               r["scoring_peak_rss_bytes"] / MiB, r["working_bytes"] / MiB, r["seconds"], r["tokens"] / r["seconds"],
               r["nll_per_token"]]
        if cuda:
            row += [r.get("cuda_max_allocated_bytes", float("nan")) / MiB, r.get("cuda_working_bytes", float("nan")) / MiB]
        rows.append(row)
    print("\nPeak memory of scoring one document (no_grad, labels=input_ids)")
    print(table(headers, rows))

    ratios = {}
    by = {}
    for r in ok:
        by.setdefault(r["variant"], {})[r["tokens"]] = r
    print("\nGrowth against the shortest length of each variant")
    rows = []
    for variant, runs in by.items():
        lengths = sorted(runs)
        base = runs[lengths[0]]
        for n in lengths[1:]:
            r = runs[n]
            entry = {
                "peak_rss": r["peak_rss_bytes"] / base["peak_rss_bytes"],
                "scoring_peak_rss": r["scoring_peak_rss_bytes"] / base["scoring_peak_rss_bytes"],
                "working": r["working_bytes"] / max(base["working_bytes"], 1),
                "working_delta_mib": (r["working_bytes"] - base["working_bytes"]) / MiB,
            }
            if cuda and "cuda_max_allocated_bytes" in r:
                entry["cuda_max_allocated"] = r["cuda_max_allocated_bytes"] / base["cuda_max_allocated_bytes"]
            ratios[f"{variant}:{n}/{lengths[0]}"] = entry
            row = [variant, f"{n}/{lengths[0]}", entry["peak_rss"], entry["scoring_peak_rss"], entry["working"],
                   entry["working_delta_mib"]]
            if cuda:
                row.append(entry.get("cuda_max_allocated", float("nan")))
            rows.append(row)
    extra = ["CUDA max alloc ratio"] if cuda else []
    print(table(["variant", "lengths", "peak RSS ratio", "scoring peak ratio", "working ratio", "working +MiB", *extra], rows))

    hmt_runs = by.get("hmt", {})
    target = None
    if hmt_runs:
        lo, hi = min(hmt_runs), max(hmt_runs)
        key = f"hmt:{hi}/{lo}"
        if key in ratios:
            value = ratios[key]["peak_rss"]
            target = value <= 1.1
            print(f"\nTarget: HMT peak RSS {hi}/{lo} <= 1.1: {'MET' if target else 'NOT MET'} ({value:.3f}; "
                  f"scoring peak {ratios[key]['scoring_peak_rss']:.3f}, working memory {ratios[key]['working']:.3f}, "
                  f"{ratios[key]['working_delta_mib']:+.1f} MiB)")

    payload = {"args": vars(args), "environment": environment(device), "results": results, "ratios": ratios,
               "target_peak_ratio_le_1_1": target, "plain_skipped_lengths": skipped}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    sys.exit(run(main))
