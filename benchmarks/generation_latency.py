"""Per-token decode latency of HMT.generate over one whole segment, against the plain
backbone's own KV-cached decoding on the same context.

A prompt of whole segments (default 1024 tokens = 4 of L=256) leaves the last segment open
and full: the first generated token closes it, and L tokens then fill a new segment. Decode
time runs from the first logits (prefill done) to the last step, timed by a streamer, so
prefill is excluded on both sides. Variants, interleaved in a rotating order per repetition:

  hmt_exact      generate(exact_retrieval=True): equal to the argmax of full forwards
  hmt_fast       generate(exact_retrieval=False): one memory search per segment
  plain_matched  the backbone's greedy KV-cached loop over k+1 prompt tokens (the same
                 context length as HMT's augmented segment): the headline baseline
  plain_prompt   the same loop over the whole prompt

Each HMT step is classified from the parts of its work HMT's decoder reports
(``hmt.generation.watch_decoding``; the memory search timed with module hooks), and exact mode's lowest
possible ratio is computed from the measured per-step costs. CPU time is the headline on a
CPU device (--clock), wall time on CUDA. benchmarks/README.md has the details and figures.

    python benchmarks/generation_latency.py --json benchmarks/results/generation_cpu.json --merge   # ~10 min CPU
    python benchmarks/generation_latency.py --quick      # smoke run: L=64, 128-token prompt, 1 repetition
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (spinning threads steal a busy core)

import contextlib
import time
from collections import defaultdict

import torch

from hmt.arguments import run
from _common import document_ids, hmt_from_args, median, parse_dtype, positive_int, synchronize, table
from _decoding import (Stamps, add_prompt_arguments, headline_clock, now, parse, parser, run_interleaved,
                       run_part, run_plain)

VARIANTS = ("hmt_exact", "hmt_fast", "plain_matched", "plain_prompt")
HMT_VARIANTS = ("hmt_exact", "hmt_fast")
PLAIN_VARIANTS = ("plain_matched", "plain_prompt")


class StreamProbe:
    """Logs what each decode step of HMT's decoder did, inside a ``with`` block: the decoder reports
    the parts of its work (``hmt.generation.watch_decoding``) and the memory search is timed by
    forward hooks; nothing in hmt is changed.

    Per step: its kind and the time spent in each wrapped call. ``encode`` (the incremental
    encoding step), ``search`` (memory search), ``prefix`` ([P|sensory|E] run again, with
    or without keeping its KV cache), ``cached`` (the batched KV-cached step), ``close``
    (writing m_n), ``search_once`` (fast mode: encoding + search once per segment)."""

    NAMES = ("cached_step", "close", "encode", "recompute", "reopen", "search_once")
    PARTS = {"encode": ("encode",), "search": ("memory_search",), "prefix": ("recompute", "reopen"),
             "cached": ("cached_step",), "close": ("close",), "search_once": ("search_once",)}

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.events: list[tuple[str, int, float, float, float, float]] = []  # name, depth, start/end wall, cpu
        self.depth = 0
        self._open_searches: list[tuple[int, float, float]] = []
        self._open_parts: list[tuple[int, float, float]] = []

    def _begin(self) -> tuple[int, float, float]:
        depth = self.depth
        self.depth += 1
        return (depth, *now(self.device))

    def _finish(self, name: str, depth: int, w0: float, c0: float) -> None:
        w1, c1 = now(self.device)
        self.events.append((name, depth, w0, w1, c0, c1))
        self.depth -= 1

    def _part(self, part: str, event: str) -> None:
        if part not in self.NAMES:
            return
        if event == "start":
            self._open_parts.append(self._begin())
        else:
            self._finish(part, *self._open_parts.pop())

    def _search_started(self, module, inputs) -> None:
        self._open_searches.append(self._begin())

    def _search_done(self, module, inputs, output) -> None:
        self._finish("memory_search", *self._open_searches.pop())

    def __enter__(self) -> "StreamProbe":
        from hmt import generation

        self._scope = contextlib.ExitStack()
        self._scope.enter_context(generation.watch_decoding(self._part))
        search = self.model.memory_search
        self._scope.callback(search.register_forward_pre_hook(self._search_started).remove)
        self._scope.callback(search.register_forward_hook(self._search_done).remove)
        return self

    def __exit__(self, *exc) -> None:
        self._scope.close()

    def reset(self) -> None:
        self.events = []

    def classify(self, stamps: Stamps) -> list[dict]:
        """Per decode step: its kind and, per clock, the seconds in each part (and ``other``:
        the step minus its top-level calls: token choice, bookkeeping, packing, LM head)."""
        marks = stamps.marks
        steps = []
        for s in range(1, len(marks) - 1):
            w0, w1 = marks[s][0], marks[s + 1][0]
            inside = [e for e in self.events if e[2] >= w0 and e[3] <= w1]
            top = {e[0] for e in inside if e[1] == 0}
            if "close" in top:
                kind = "close + reopen" if "reopen" in top else "close + recompute"
            elif "reopen" in top:
                kind = "P final: reopen"
            elif "recompute" in top:
                kind = "recompute"
            elif "cached_step" in top:
                kind = "cached"
            else:
                kind = "other"
            info = {"kind": kind}
            for c, (i0, i1) in (("wall", (2, 3)), ("cpu", (4, 5))):
                step = marks[s + 1][0 if c == "wall" else 1] - marks[s][0 if c == "wall" else 1]
                parts = {part: sum(e[i1] - e[i0] for e in inside if e[0] in names) for part, names in self.PARTS.items()}
                parts["other"] = step - sum(e[i1] - e[i0] for e in inside if e[1] == 0)
                info[c] = parts
            steps.append(info)
        return steps


def run_hmt(model, open_ids, prefix_state, steps: int, exact: bool, device, probe=None):
    stamps = Stamps(device)
    if probe is not None:
        probe.reset()
    out = model.generate(open_ids, memory_state=prefix_state, max_new_tokens=steps, exact_retrieval=exact,
                         streamer=stamps, do_sample=False)
    fig = stamps.figures()
    fig["tokens"] = out.sequences[0, open_ids.shape[1]:].tolist()
    if probe is not None:
        fig["step_info"] = probe.classify(stamps)
    return fig


def exact_bound(exact: dict, plain_step: float, L: int, j: int, k: int, med: dict) -> dict:
    """The lowest exact-mode ratio: the prefix recomputes of steps 1..j are unavoidable (P_n
    changes with each of the first j tokens); everything else at the plain step's price
    (the closing step feeds one position, as a plain step does). ``bound_ideal`` prices
    those prefix positions at the full-pass price per position of the longest one (t = j)."""
    steps = exact["per_step_s"]
    parts = exact["per_step_parts_s"]
    prefix = [parts["prefix"][t - 1] for t in range(1, j + 1)]
    positions = [1 + k + t for t in range(1, j + 1)]
    bound_s = sum(prefix) + (L - j + 1) * plain_step
    per_position = sum(prefix) / sum(positions)
    best_per_position = prefix[-1] / positions[-1]
    ideal_s = best_per_position * sum(positions) + (L - j + 1) * plain_step
    measured = sum(steps)
    return {
        "measured_s": measured, "measured_ratio": measured / (L * plain_step),
        "median_ratio_of_medians": med["hmt_exact"] / med["plain_matched"],
        "encode_s": sum(parts["encode"]), "search_s": sum(parts["search"]), "prefix_s": sum(prefix),
        "prefix_positions": sum(positions), "prefix_s_per_position": per_position,
        "bound_s": bound_s, "bound_ratio": bound_s / (L * plain_step),
        "bound_ideal_s": ideal_s, "bound_ideal_ratio": ideal_s / (L * plain_step), "plain_step_s": plain_step,
    }


# --------------------------------------------------------------------------- measurement
def latency(args, device) -> dict:
    import hmt
    from hmt import backbone as bb

    clock, dtype = headline_clock(args, device), parse_dtype(args.dtype)
    t0 = time.perf_counter()
    backbone, tokenizer = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    torch.manual_seed(0)  # W_q, W_k come from the global RNG
    model = hmt_from_args(backbone, args)
    config = model.config
    L, j, k = config.segment_length, config.representation_length, config.sensory_memory_size
    segments = max(1, -(-args.prompt_tokens // L))
    T = segments * L  # a whole number of segments: decoding starts right at a boundary
    ids = document_ids(tokenizer, T).to(device)
    limit = bb.max_positions(backbone)
    variants = [v for v in VARIANTS if v != "plain_prompt" or limit is None or T + L <= limit]
    print(f"\n=== Decode latency over one segment ===\n"
          f"backbone {type(bb.unwrap(backbone)).__name__}, loaded in {time.perf_counter() - t0:.1f}s on {device}, "
          f"{dtype}, torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"L={L}, j={j}, k={k}, N={config.num_memory_embeddings}; prompt {T} tokens ({segments} segments) of Python "
          f"stdlib source; {L} generated tokens from the segment boundary; {args.repeats} repetitions; "
          f"headline clock: {clock}")
    if "plain_prompt" not in variants:
        print(f"  plain_prompt skipped: {T}+{L} positions exceed the backbone's limit {limit}")

    with torch.no_grad():
        w, c = time.perf_counter(), time.process_time()
        prefix_state = model.new_memory(1)
        if T > L:  # the closed segments of the prompt, read once, shared by every repetition
            prefix_state = model(ids[:, : T - L], memory_state=prefix_state, return_logits=False).memory_state
        synchronize(device)
        prefix_s = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
    open_ids = ids[:, T - L:]
    print(f"  prompt's first {T - L} tokens read once: {prefix_s['wall']:.1f}s wall, {prefix_s['cpu']:.1f}s cpu "
          f"({(T - L) / max(prefix_s['wall'], 1e-9):.0f} tokens/s wall)")

    with StreamProbe(model, device) as probe:
        runners = {
            "hmt_exact": lambda n: run_hmt(model, open_ids, prefix_state, n, True, device, probe),
            "hmt_fast": lambda n: run_hmt(model, open_ids, prefix_state, n, False, device, probe),
            "plain_matched": lambda n: run_plain(backbone, ids[:, T - (k + 1):], n, device),
            "plain_prompt": lambda n: run_plain(backbone, ids, n, device),
        }
        runs = run_interleaved(
            {v: runners[v] for v in variants}, L, args.repeats, "ms/token wall/cpu",
            lambda v, fig: f"{v} {1e3 * fig['wall']['decode_s'] / L:.1f}/{1e3 * fig['cpu']['decode_s'] / L:.1f}")

    # ------------------------------------------------------------------ figures
    per_token = {c: {v: [r[c]["decode_s"] / L for r in runs[v]] for v in variants} for c in ("wall", "cpu")}
    med = {c: {v: median(per_token[c][v]) for v in variants} for c in ("wall", "cpu")}
    prefill = {c: {v: median([r[c]["prefill_s"] for r in runs[v]]) for v in variants} for c in ("wall", "cpu")}
    context = {
        "hmt_exact": f"1+{k}+i (+1 close)",
        "hmt_fast": f"1+{k}+i (+1 close)",
        "plain_matched": f"{k + 1}+i",
        "plain_prompt": f"{T}+i",
    }
    print(f"\nDecode latency, L={L} tokens from a segment boundary (medians over {args.repeats} repetitions; "
          f"prefill excluded; i = 1..{L})")
    rows = []
    for v in variants:
        hc = per_token[clock][v]
        rows.append([v, context[v], 1e3 * prefill["wall"][v], 1e3 * med["wall"][v], 1e3 * med["cpu"][v],
                     1e3 * min(hc), 1e3 * max(hc), L / med["wall"][v]])
    print(table(["variant", "attends over", "prefill ms (wall)", "ms/token wall", "ms/token cpu",
                 f"min ({clock})", f"max ({clock})", "tokens/s wall"], rows))
    print("  prefill: HMT = the open segment's own [P|sensory|E] (+ encoding) pass, the closed prompt segments "
          "being read once beforehand; plain = its whole prompt. Neither is in the decode figures.")

    ratios, rows = {}, []
    for h in HMT_VARIANTS:
        for p in PLAIN_VARIANTS:
            if p not in variants:
                continue
            for c in ("wall", "cpu"):
                paired = [a / b for a, b in zip(per_token[c][h], per_token[c][p])]
                ratios[f"{c}:{h}/{p}"] = {"paired_median": median(paired), "paired_all": paired,
                                          "of_medians": med[c][h] / med[c][p]}
                rows.append([f"{h} / {p}", c, median(paired), min(paired), max(paired), med[c][h] / med[c][p],
                             "MET" if median(paired) <= 1.1 else "NOT MET"])
    print("\nHMT / plain decode time per token (median of per-repetition paired ratios; target <= 1.1)")
    print(table(["ratio", "clock", "paired median", "min", "max", "of medians", "<= 1.1"], rows))

    # where the time goes: per kind of step (median over repetitions of each step's time)
    breakdown = {}
    rows = []
    plain_step = median([median(r[clock]["steps_s"]) for r in runs["plain_matched"]])
    part_names = list(StreamProbe.PARTS) + ["other"]
    for v in HMT_VARIANTS:
        info = runs[v][0]["step_info"]
        n = len(info)
        step_med = [median([r[clock]["steps_s"][s] for r in runs[v]]) for s in range(n)]
        part_med = {p: [median([r["step_info"][s][clock][p] for r in runs[v]]) for s in range(n)] for p in part_names}
        total = sum(step_med)
        kinds = defaultdict(list)
        for s, st in enumerate(info):
            kinds[st["kind"]].append(s)
        breakdown[v] = {}
        for kind, idx in kinds.items():
            t = sum(step_med[s] for s in idx)
            parts = {p: sum(part_med[p][s] for s in idx) for p in part_names}
            breakdown[v][kind] = {"steps": len(idx), "first_step": idx[0] + 1, "last_step": idx[-1] + 1,
                                  "total_s": t, "mean_step_s": t / len(idx), "share": t / total,
                                  "parts_s": parts}
            rows.append([v, kind, f"{idx[0] + 1}..{idx[-1] + 1}", len(idx), 1e3 * t / len(idx), 1e3 * t,
                         f"{100 * t / total:.1f}%", *[1e3 * parts[p] / len(idx) for p in part_names],
                         t / len(idx) / plain_step])
        breakdown[v]["per_step_s"] = step_med
        breakdown[v]["per_step_parts_s"] = part_med
    print(f"\nWhere HMT's decode time goes ({clock} clock; per kind of step, medians over repetitions; "
          f"plain_matched step = {1e3 * plain_step:.1f} ms; part columns in ms per step)")
    print(table(["variant", "step kind", "steps", "n", "ms/step", "ms per segment", "share of segment",
                 *part_names, "vs plain step"], rows))
    print("  encode: incremental encoding step [E_t, T]; search: memory search; prefix: [P|sensory|E] run again; "
          "cached: the KV-cached step (feeding P_n when closing); close: writing m_n; search_once: fast mode's one "
          "encoding + search per segment; other: token choice, LM head, bookkeeping")

    # per-step profile along the segment
    bins = sorted({1, 2, max(2, j // 4), max(2, j // 2), max(2, 3 * j // 4), j, j + 1, max(j + 1, (j + L) // 2), L + 1})
    bins = [b for b in bins if b <= L + 1]
    profile_rows = []
    # steps_s has L entries on both sides: put(token s) -> put(token s+1), the last one -> end()
    step_curves = {v: [median([r[clock]["steps_s"][s] for r in runs[v]]) for s in range(len(runs[v][0][clock]["steps_s"]))]
                   for v in variants}
    for a, b in zip(bins, bins[1:]):
        row = [f"{a}..{b - 1}" if b - 1 > a else f"{a}"]
        for v in variants:
            seg = step_curves[v][a - 1: b - 1]
            row.append(1e3 * sum(seg) / max(len(seg), 1))
        profile_rows.append(row)
    print(f"\nMean ms per step along the segment ({clock} clock; step i feeds the segment's i-th token)")
    print(table(["steps", *variants], profile_rows))

    ex, fa = runs["hmt_exact"][0]["tokens"], runs["hmt_fast"][0]["tokens"]
    agree = next((s for s, (a, b) in enumerate(zip(ex, fa)) if a != b), len(ex))
    print(f"  tokens: exact and fast agree on the first {agree} of {L} (untrained memory parameters: "
          "the two modes may diverge as soon as their memory tokens differ)")

    bound = exact_bound(breakdown["hmt_exact"], plain_step, L, j, k, med[clock])
    print(f"\nExact mode, the lowest ratio it can reach ({clock} clock): while a segment holds t < j tokens P_n "
          f"changes with each token, so steps 1..j must run [P_n | sensory | E[:t]] again (1+{k}+t positions; no "
          f"position after P_n can be reused).")
    print(table(["measure", "ms per segment", "ms/token", "vs plain_matched"], [
        ["exact mode as measured", 1e3 * bound["measured_s"], 1e3 * bound["measured_s"] / L, bound["measured_ratio"]],
        ["  of which incremental encoding", 1e3 * bound["encode_s"], 1e3 * bound["encode_s"] / L, float("nan")],
        ["  of which prefix recomputes, steps 1..j", 1e3 * bound["prefix_s"], 1e3 * bound["prefix_s"] / L,
         float("nan")],
        ["bound: those prefixes + (L-j+1) plain steps", 1e3 * bound["bound_s"], 1e3 * bound["bound_s"] / L,
         bound["bound_ratio"]],
        ["bound: prefixes at the full-pass price per position", 1e3 * bound["bound_ideal_s"],
         1e3 * bound["bound_ideal_s"] / L, bound["bound_ideal_ratio"]],
    ]))
    print(f"  prefix recomputes: {bound['prefix_positions']} backbone positions per segment, "
          f"{1e3 * bound['prefix_s_per_position']:.2f} ms/position measured; a plain step is "
          f"{1e3 * plain_step:.1f} ms. Fast mode (one search per segment) is not bound by this.")

    return {
        "config": config.to_dict(), "prompt_tokens": T, "generated": L, "variants": variants, "headline_clock": clock,
        "prefix_read_s": prefix_s, "per_token_s": per_token, "median_per_token_s": med, "prefill_s": prefill,
        "ratios": ratios, "breakdown": breakdown, "exact_fast_agree_prefix": agree,
        "exact_bound": bound,
        "target_le_1_1": {key: val["paired_median"] <= 1.1 for key, val in ratios.items()},
        "runs": {v: [{c: {kk: vv for kk, vv in r[c].items()} for c in ("wall", "cpu")} for r in runs[v]] for v in variants},
    }


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = parser(__doc__, "smoke run: L=64 j=32 k=8, 128-token prompt, 1 repetition")
    add_prompt_arguments(p, "prompt length, rounded up to whole segments (default 1024)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions of each variant (interleaved)")
    return parse(p, argv, prompt_tokens=128, repeats=1)


def main(argv=None) -> dict:
    return run_part("latency", "generation_latency.py", latency, parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(run(main))
