"""Batched decoding with HMT.generate: B rows decoded together against the same rows one at a
time, and the plain backbone's own batched KV-cached decoding as the reference.

--batch (4) prompts of --prompt-tokens (1024) tokens, consecutive stretches of the same text
(Python standard-library source), their closed segments read once; each row decodes L tokens
from its segment boundary. Variants, interleaved per repetition: HMT's ``generate`` on the
batch and on each row alone (the B decode times summed), per --batch-modes (exact, fast); the
plain backbone's greedy KV-cached loop on B rows of k+1 tokens and on each row alone. Decode
time runs from the end of the decoder's set-up (the open segments' prefill) to its last step,
timed by wrapping HMT's decoder for the call only. Reported: tokens/s, the speed-ups of batch
B over B x 1, HMT / plain at batch B, and whether the batch rows equal the rows alone.

    python benchmarks/generation_batch.py --json benchmarks/results/generation_cpu.json --merge   # ~25 min CPU
    python benchmarks/generation_batch.py --batch-modes fast --batch-repeats 3   # fast mode only
    python benchmarks/generation_batch.py --quick      # smoke run: L=64, 128-token prompts, 1 repetition
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (spinning threads steal a busy core)

import torch

from hmt.arguments import run
from _common import document_ids, hmt_from_args, median, parse_dtype, positive_int, table
from _decoding import (DecodeClock, add_prompt_arguments, headline_clock, parse, parser, run_interleaved, run_part,
                       run_plain)


def batched(args, device) -> dict:
    """HMT's batched decoding against the same rows one at a time, and the plain backbone's own
    batched KV-cached decoding as the reference."""
    import hmt
    from hmt import MemoryState
    from hmt import backbone as bb

    clock, dtype = headline_clock(args, device), parse_dtype(args.dtype)
    backbone, tokenizer = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    torch.manual_seed(0)
    model = hmt_from_args(backbone, args)
    config = model.config
    L, j, k, B = config.segment_length, config.representation_length, config.sensory_memory_size, args.batch
    segments = max(1, -(-args.prompt_tokens // L))
    T = segments * L
    prompts = document_ids(tokenizer, B * T).to(device).view(B, T)  # B different prompts of the same text
    print(f"\n=== Batched decoding ===\nbackbone {type(bb.unwrap(backbone)).__name__} on {device}, {dtype}, "
          f"torch threads {torch.get_num_threads()}; L={L}, j={j}, k={k}; {B} prompts of {T} tokens ({segments} "
          f"segments, consecutive stretches of Python stdlib source); {L} generated tokens per row from the segment "
          f"boundary; modes {', '.join(args.batch_modes)}; {args.batch_repeats} repetitions; headline clock: {clock}")
    with torch.no_grad():  # the closed segments of every prompt, read once
        states = []
        for i in range(B):
            state = model.new_memory(1)
            if T > L:
                state = model(prompts[i : i + 1, : T - L], memory_state=state, return_logits=False).memory_state
            states.append(state)
    open_ids = prompts[:, T - L:]

    def hmt_run(rows, exact: bool, steps: int) -> dict:
        state = MemoryState.cat([states[i] for i in rows])
        with DecodeClock(device) as stamps:
            out = model.generate(open_ids[rows], memory_state=state, max_new_tokens=steps, exact_retrieval=exact,
                                 do_sample=False)
        fig = stamps.figures()
        fig["tokens"] = out.sequences[:, L:].tolist()
        return fig

    def plain_run(rows, steps: int) -> dict:
        fig = run_plain(backbone, prompts[rows, T - (k + 1):], steps, device)
        tokens = fig["tokens"]
        return {"wall": {"decode_s": fig["wall"]["decode_s"]}, "cpu": {"decode_s": fig["cpu"]["decode_s"]},
                "tokens": tokens if len(rows) > 1 else [tokens]}

    def one_at_a_time(run, steps: int) -> dict:
        figs = [run([i], steps) for i in range(B)]
        return {"wall": {"decode_s": sum(f["wall"]["decode_s"] for f in figs)},
                "cpu": {"decode_s": sum(f["cpu"]["decode_s"] for f in figs)},
                "tokens": [t for f in figs for t in f["tokens"]]}

    everyone = list(range(B))
    runners = {}
    for mode in args.batch_modes:
        exact = mode == "exact"
        runners[f"hmt_{mode}_batch{B}"] = lambda n, e=exact: hmt_run(everyone, e, n)
        runners[f"hmt_{mode}_{B}x1"] = lambda n, e=exact: one_at_a_time(lambda rows, m: hmt_run(rows, e, m), n)
    runners[f"plain_batch{B}"] = lambda n: plain_run(everyone, n)
    runners[f"plain_{B}x1"] = lambda n: one_at_a_time(plain_run, n)
    variants = list(runners)
    runs = run_interleaved(runners, L, args.batch_repeats, "decode wall/cpu",
                           lambda v, fig: f"{v} {fig['wall']['decode_s']:.1f}/{fig['cpu']['decode_s']:.1f}s")

    tokens = B * L
    med = {c: {v: median([r[c]["decode_s"] for r in runs[v]]) for v in variants} for c in ("wall", "cpu")}
    rows = [[v, 1e3 * med["wall"][v] / tokens, 1e3 * med["cpu"][v] / tokens, tokens / med["wall"][v],
             tokens / med["cpu"][v]] for v in variants]
    print(f"\nDecoding {B} rows x {L} tokens (medians over {args.batch_repeats} repetitions; prefill excluded)")
    print(table(["variant", "ms/token wall", "ms/token cpu", "tokens/s wall", "tokens/s cpu"], rows))

    def paired(a: str, b: str, c: str) -> list[float]:
        return [x[c]["decode_s"] / y[c]["decode_s"] for x, y in zip(runs[a], runs[b])]

    ratios, rows = {}, []
    comparisons = []
    for mode in args.batch_modes:
        comparisons += [(f"hmt_{mode}_{B}x1", f"hmt_{mode}_batch{B}", f"HMT {mode}: speed-up of batch {B} over {B} x 1"),
                        (f"hmt_{mode}_batch{B}", f"plain_batch{B}", f"HMT {mode} / plain, both batch {B} (time)"),
                        (f"hmt_{mode}_{B}x1", f"plain_{B}x1", f"HMT {mode} / plain, both {B} x 1 (time)")]
    comparisons.append((f"plain_{B}x1", f"plain_batch{B}", f"plain: speed-up of batch {B} over {B} x 1"))
    for a, b, label in comparisons:
        for c in ("wall", "cpu"):
            values = paired(a, b, c)
            ratios[f"{c}:{a}/{b}"] = {"paired_median": median(values), "paired_all": values,
                                      "of_medians": med[c][a] / med[c][b], "label": label}
            if c == clock:
                rows.append([label, c, median(values), min(values), max(values), med[c][a] / med[c][b]])
    print(f"\nRatios ({clock} clock; median of per-repetition paired ratios)")
    print(table(["ratio", "clock", "paired median", "min", "max", "of medians"], rows))

    agree = {}
    for mode in args.batch_modes:
        batch, single = runs[f"hmt_{mode}_batch{B}"][0]["tokens"], runs[f"hmt_{mode}_{B}x1"][0]["tokens"]
        agree[mode] = [next((s for s, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(batch, single)]
        print(f"  {mode}: batch rows equal the rows alone for the first {agree[mode]} of {L} tokens")
    return {
        "config": config.to_dict(), "batch": B, "prompt_tokens": T, "generated_per_row": L, "modes": args.batch_modes,
        "headline_clock": clock, "median_decode_s": med, "ratios": ratios, "batch_equals_alone_prefix": agree,
        "runs": {v: [{c: r[c] for c in ("wall", "cpu")} for r in runs[v]] for v in variants},
    }


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = parser(__doc__, "smoke run: L=64 j=32 k=8, 128-token prompts, 1 repetition")
    add_prompt_arguments(p, "prompt length of each row, rounded up to whole segments (default 1024)")
    p.add_argument("--batch", type=positive_int, default=4, help="rows decoded together (default 4)")
    p.add_argument("--batch-repeats", type=positive_int, default=2, help="timed repetitions of each variant")
    p.add_argument("--batch-modes", nargs="+", choices=("exact", "fast"), default=["exact", "fast"],
                   help="HMT decoding modes to time")
    return parse(p, argv, prompt_tokens=128, batch_repeats=1)


def main(argv=None) -> dict:
    return run_part("batch", "generation_batch.py", batched, parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(run(main))
