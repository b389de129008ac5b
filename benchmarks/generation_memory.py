"""Memory of HMT.generate stays flat: a long prompt against a short one, the same number of
tokens generated after each, each run in its own fresh process.

``generate`` on a --long-tokens (100,000) prompt then --gen-tokens (1,000) new tokens, against
a --short-tokens (4,096) prompt with the same generation. Per run: RSS after loading the model
and a small warm-up generate (weights touched, lazy library state built), then the peak of the
measured generate call (the kernel's high-water mark is reset after loading); working memory
= peak - after load; on CUDA, torch.cuda.max_memory_allocated above the allocation after load.
Target: long/short <= 1.1. "live at end" is the RSS once the output is dropped and glibc's
free heap handed back (malloc_trim). --malloc-mmap-threshold BYTES runs the workers with
glibc's MALLOC_MMAP_THRESHOLD_, a diagnosis of allocator retention.

    python benchmarks/generation_memory.py --json benchmarks/results/generation_cpu.json --merge   # ~15 min CPU
    python benchmarks/generation_memory.py --long-tokens 100000 --memory-mode fast
    python benchmarks/generation_memory.py --malloc-mmap-threshold 131072   # allocator diagnosis
    python benchmarks/generation_memory.py --quick     # smoke run: L=64, 2048 vs 512 tokens, 64 generated
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (spinning threads steal a busy core)

import argparse
import gc
import sys

import torch

from hmt.arguments import run
from _common import (MemoryWatch, _status_kib, non_negative_int, positive_int, add_worker_arguments, current_rss_bytes, document_ids, hmt_from_args,
                     model_argv, parse_dtype, pick_device, print_result, ru_maxrss_bytes, run_workers, synchronize,
                     table, worker_env)
from _decoding import Stamps, parse, parser, run_part

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024


# --------------------------------------------------------------------------- worker
def memory_worker(args) -> dict:
    import hmt

    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype)
    backbone, _ = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    torch.manual_seed(0)
    model = hmt_from_args(backbone, args)
    ids = torch.load(args.ids_file)[:, : args.length].contiguous().to(device)
    T = ids.shape[1]
    exact = args.memory_mode == "exact"
    with torch.no_grad():
        # Weights are memory-mapped: touch them all; then a tiny generate (8-token prompt,
        # 2 new tokens: lazy imports and library state) -- small on purpose, so that the
        # working memory below is generation's own footprint (per-segment activations,
        # logits, KV cache), not just what exceeds a warm-up's retained heap.
        for p in model.parameters():
            p.sum()
        model.generate(ids[:, :8], memory_state=model.new_memory(1), max_new_tokens=2, exact_retrieval=exact)
    watch = MemoryWatch(device)
    watch.loaded()

    class Rss(Stamps):  # also samples RSS at the end of prefill and at the end
        def put(self, value):
            if not self.marks:
                self.rss_after_prefill = current_rss_bytes()
            super().put(value)

        def end(self):
            self.rss_at_end = current_rss_bytes()
            super().end()

    stamps = Rss(device)
    with torch.no_grad():
        out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=args.gen_tokens,
                             exact_retrieval=exact, streamer=stamps, do_sample=False)
    synchronize(device)
    fig = stamps.figures()
    generated = int(out.sequences.shape[1] - T)
    segments_closed, cache_size = int(out.memory_state.segments_seen[0]), int(out.memory_state.cache_sizes[0])
    maxrss = ru_maxrss_bytes()
    hwm = _status_kib("VmHWM")
    hwm = hwm * 1024 if hwm is not None else None
    memory = watch.figures("generate", watch.peak(hwm if watch.was_reset else None))
    # What of the end RSS is live: drop the output, then hand glibc's free heap back.
    del out
    gc.collect()
    trimmed = None
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = current_rss_bytes()
    except (OSError, AttributeError):
        pass
    return {
        "tokens": T, "generated": generated, "mode": args.memory_mode,
        "prefill_s": fig["wall"]["prefill_s"], "decode_s": fig["wall"]["decode_s"],
        "prefill_cpu_s": fig["cpu"]["prefill_s"], "decode_cpu_s": fig["cpu"]["decode_s"],
        "ru_maxrss_bytes": maxrss, "vmhwm_bytes": hwm, **memory,
        "rss_after_prefill_bytes": stamps.rss_after_prefill, "rss_at_end_bytes": stamps.rss_at_end,
        "rss_after_malloc_trim_bytes": trimmed, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "segments_closed": segments_closed, "cache_size": cache_size,
        "threads": torch.get_num_threads(), "device": str(device),
    }


def worker_command(args, length: int, ids_file: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, "generation_memory.py"), "--worker", "--length", str(length),
            "--ids-file", ids_file, *model_argv(args), "--gen-tokens", str(args.gen_tokens),
            "--memory-mode", args.memory_mode]


# --------------------------------------------------------------------------- parent
def memory(args, device) -> dict:
    import hmt

    _, tokenizer = hmt.load_backbone(args.backbone)
    lengths = [args.short_tokens, args.long_tokens]
    print(f"\n=== Memory stays flat ===\n{args.long_tokens}- vs {args.short_tokens}-token prompt (Python stdlib "
          f"source), then {args.gen_tokens} generated tokens ({args.memory_mode} mode), each in its own subprocess, "
          f"{args.threads} thread(s), device {device}", flush=True)
    if args.malloc_mmap_threshold:
        print(f"  workers run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (allocator diagnosis)")
    ids = document_ids(tokenizer, max(lengths))

    def started(n: int, pid: int) -> None:
        print(f"  started {n}-token run (pid {pid})", flush=True)

    def done(n: int, r: dict, seconds: float) -> None:
        print(f"  {n}-token run done in {seconds:.0f}s: peak {r['generate_peak_rss_bytes'] / MiB:.1f} "
              f"MiB, working {r['working_bytes'] / MiB:.1f} MiB", flush=True)

    results = run_workers(sorted(lengths, reverse=True), lambda n, ids_file: worker_command(args, n, ids_file), ids,
                          jobs=args.jobs, env=worker_env(MALLOC_MMAP_THRESHOLD_=args.malloc_mmap_threshold or None),
                          label=lambda n: f"{n}-token run", started=started, done=done)
    results = {n: {"tokens": n, **r} if "error" in r else r for n, r in results.items()}

    ok = [results[n] for n in lengths if "error" not in results[n]]
    cuda = any("cuda_max_allocated_bytes" in r for r in ok)
    headers = ["prompt", "generated", "mode", "prefill s", "prefill tok/s", "decode ms/token", "after load MiB",
               "generate peak MiB", "working MiB", "RSS after prefill", "RSS at end", "live at end", "ru_maxrss MiB",
               "cache"]
    if cuda:
        headers += ["CUDA max alloc MiB", "CUDA working MiB"]
    rows = []
    for r in ok:
        row = [r["tokens"], r["generated"], r["mode"], r["prefill_s"], r["tokens"] / r["prefill_s"],
               1e3 * r["decode_s"] / max(r["generated"], 1), r["rss_after_load_bytes"] / MiB,
               r["generate_peak_rss_bytes"] / MiB, r["working_bytes"] / MiB, r["rss_after_prefill_bytes"] / MiB,
               r["rss_at_end_bytes"] / MiB,
               r["rss_after_malloc_trim_bytes"] / MiB if r.get("rss_after_malloc_trim_bytes") else float("nan"),
               r["ru_maxrss_bytes"] / MiB, r["cache_size"]]
        if cuda:
            row += [r["cuda_max_allocated_bytes"] / MiB, r["cuda_working_bytes"] / MiB]
        rows.append(row)
    print("\nPeak memory of generate(prompt, max_new_tokens) (RSS in MiB; working = generate peak - after load; "
          "live at end = RSS once the output is dropped and glibc's free heap handed back by malloc_trim)")
    print(table(headers, rows))

    ratios, target = {}, None
    if len(ok) == 2:
        short, long_ = ok
        ratios = {
            "working": long_["working_bytes"] / max(short["working_bytes"], 1),
            "generate_peak_rss": long_["generate_peak_rss_bytes"] / short["generate_peak_rss_bytes"],
            "working_delta_mib": (long_["working_bytes"] - short["working_bytes"]) / MiB,
        }
        rows = [["working memory (peak - after load)", ratios["working"]],
                ["whole-process peak RSS of generate", ratios["generate_peak_rss"]]]
        if cuda:
            ratios["cuda_working"] = long_["cuda_working_bytes"] / max(short["cuda_working_bytes"], 1)
            ratios["cuda_max_allocated"] = long_["cuda_max_allocated_bytes"] / short["cuda_max_allocated_bytes"]
            rows += [["CUDA working (max alloc - after load)", ratios["cuda_working"]],
                     ["CUDA max allocated", ratios["cuda_max_allocated"]]]
        headline = ratios["cuda_working" if cuda else "working"]
        target = headline <= 1.1
        print(f"\n{long_['tokens']}-token / {short['tokens']}-token prompt, {args.gen_tokens} generated each")
        print(table(["measure", "ratio long/short"], rows))
        print(f"  target <= 1.1 ({'CUDA working' if cuda else 'working memory'}): {'MET' if target else 'NOT MET'} "
              f"({headline:.3f}; {ratios['working_delta_mib']:+.1f} MiB)")
    return {"lengths": lengths, "results": [results[n] for n in lengths], "ratios": ratios, "target_le_1_1": target}


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = parser(__doc__, "smoke run: L=64 j=32 k=8, 2048 vs 512 tokens, 64 generated")
    p.add_argument("--long-tokens", type=positive_int, default=100_000, help="the long prompt (default 100000)")
    p.add_argument("--short-tokens", type=positive_int, default=4096, help="the short prompt (default 4096)")
    p.add_argument("--gen-tokens", type=positive_int, default=1000, help="tokens generated after each prompt")
    p.add_argument("--memory-mode", choices=("exact", "fast"), default="exact",
                   help="exact_retrieval=True (default) or False for the generated tokens")
    p.add_argument("--jobs", type=positive_int, default=1, help="subprocesses at once (default 1)")
    p.add_argument("--malloc-mmap-threshold", type=non_negative_int, default=None, metavar="BYTES",
                   help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: blocks this large are "
                   "mmapped and handed back on free, so freed heap memory is not retained (diagnosis)")
    # internal: one measurement in this process
    add_worker_arguments(p)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    return parse(p, argv, long_tokens=2048, short_tokens=512, gen_tokens=64)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print_result(memory_worker(args))
        return {"ok": True}
    return run_part("memory", "generation_memory.py", memory, args, argv)


if __name__ == "__main__":
    sys.exit(run(main))
