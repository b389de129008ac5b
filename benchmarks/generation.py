"""Generation with HMT: per-token decode latency over one segment, batched decoding, and
memory that stays flat.

Default setting (the issue's): SmolLM2-135M, L=256, j=128, k=32, N=300, float32,
torch.no_grad, greedy decoding, real text (Python standard-library source) as prompts.

1. Decode latency (--parts latency). A prompt of a whole number of segments (default 1024
   tokens = 4) is given to HMT.generate, so its last segment is open and *full*: the first
   generated token closes it (one KV-cached step feeding the trailing memory token) and
   opens a new segment, and L=256 generated tokens then fill that new segment exactly --
   one whole segment of decoding, segment-closing step included. Decode time runs from the
   moment the first token's logits exist (prefill done) to the last step, timed with a
   streamer (its ``put(prompt)`` marks the end of prefill, each ``put(token)`` one step), so
   prefill is excluded on both sides. Every step feeds one token and produces the next
   logits, i.e. L steps for L tokens, on both sides. The closed segments of the prompt
   are read once (``model(...)``) and their memory reused by every repetition; each
   repetition still re-runs the open segment's own prefill (reported, not counted).

   Variants, interleaved in a rotating order in every repetition (so load from other
   processes hits all of them alike); medians and paired per-repetition ratios:

     hmt_exact      generate(exact_retrieval=True): bit-exact with full forwards. While the
                    new segment holds t < j tokens its memory token P_n changes every step,
                    so [P_n | sensory | E[:t]] is recomputed every step; the encoding pass
                    [T | E[:t] | T] is incremental (a KV cache over [T | E[:t]] takes the
                    new token and T as a 2-position step); KV-cached from the j-th token on.
     hmt_fast       generate(exact_retrieval=False): one memory search per segment, every
                    step KV-cached.
     plain_matched  the plain backbone, HF KV cache, manual greedy loop
                    ``backbone(input_ids=tok, cache=..., use_cache=True)``, prompt = the
                    last k+1 prompt tokens: feeding the i-th token it attends over 1+k+i
                    positions, exactly what HMT's augmented segment [P_n|sensory|E[:i]]
                    holds. The headline baseline (same context length).
     plain_prompt   the same loop over the whole prompt (context T+i): what decoding this
                    prompt with the plain backbone costs (needs T+L <= its position limit).

   Where the time goes: each step is classified from the calls HMT's decode loop
   (``hmt.generation._DecodeBatch``) makes (wrapped, not changed): "close + reopen" / "close +
   recompute" (the segment-closing step), "recompute" (the augmented prefix run again,
   exact mode, t < j), "P final: reopen" (t = j: the prefix once more, keeping its KV
   cache), "cached" (one KV-cached position); per step the time in the incremental
   encoding, the memory search, the prefix runs, the cached step, the memory write.
   Then the exact-mode bound: the prefix recomputes of steps 1..j cannot be avoided (every
   position after P_n attends to it), so exact mode cannot beat
   (sum of those prefix runs + (L-j+1) plain steps) / (L plain steps), computed from the
   measured per-step costs.

2. Memory stays flat (--parts memory). ``generate`` on a --long-tokens (default 100,000)
   prompt followed by --gen-tokens (1,000) generated tokens, against a --short-tokens
   (4,096) prompt with the same generation, each in its own subprocess. Per run: RSS after
   loading the model and a warm-up generate (weights touched, lazy library state built),
   then the peak of the generate call itself (the kernel's high-water mark is reset after
   loading through /proc/self/clear_refs, then read as ru_maxrss and VmHWM); working
   memory = peak - after load. On CUDA: torch.cuda.max_memory_allocated minus the
   allocation after load. Target: long/short <= 1.1. "live at end" is the RSS after the
   output is dropped and glibc's free heap is handed back (malloc_trim): RSS the allocator
   merely retains is not live tensors. --malloc-mmap-threshold BYTES runs the workers with
   glibc's MALLOC_MMAP_THRESHOLD_ (blocks that large are mmapped, returned on free): a
   diagnosis of allocator retention, as in long_document_memory.py.

3. Batched decoding (--parts batch). --batch (4) prompts of --prompt-tokens (1024) tokens,
   consecutive stretches of the same text, closed segments read once; each row decodes L
   tokens from its segment boundary. Variants, interleaved per repetition: HMT's
   ``generate`` on the batch (one batched backbone call per kind of step) and on each row
   alone (the decode times of the B calls summed), in exact and fast mode; the plain
   backbone's own greedy KV-cached loop on the batch (B rows of k+1 tokens, as
   plain_matched) and on each row alone. Decode time runs from the end of the decode
   set-up (the open segments' prefill) to the end of its last step. Reported: tokens/s,
   HMT's speed-up batch B vs B x 1, the plain backbone's, and HMT / plain time at batch B,
   and whether the batch rows equal the rows alone.

Threads and clocks: OMP_WAIT_POLICY=PASSIVE is set before torch is imported and --threads
defaults to 1. Both wall time and this process's CPU time are recorded; on a shared CPU
the CPU time with one thread is the steadier figure, so the headline uses it on a CPU
device (--clock to change) and wall on CUDA.

    python benchmarks/generation.py --json gen.json        # everything: ~10 min CPU for the latency part,
                                                           # ~25 min for the batch part, ~15 min for memory
    python benchmarks/generation.py --parts latency        # decode latency only
    python benchmarks/generation.py --parts batch --batch 4
    python benchmarks/generation.py --parts memory --long-tokens 100000 --memory-mode fast
    python benchmarks/generation.py --parts memory --malloc-mmap-threshold 131072   # allocator diagnosis
    python benchmarks/generation.py --parts memory --json results.json --merge      # keep the other parts' figures
    python benchmarks/generation.py --quick                # smoke run, small config, a few minutes

(Wall times on a shared CPU are 2-3x the CPU times.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (spinning threads steal a busy core)

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

from _common import document_ids, environment, median, parse_dtype, pick_device, synchronize, table, write_json
from _common import MemoryWatch, _status_kib, current_rss_bytes, hmt_from_args, ru_maxrss_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024
VARIANTS = ("hmt_exact", "hmt_fast", "plain_matched", "plain_prompt")
HMT_VARIANTS = ("hmt_exact", "hmt_fast")
PLAIN_VARIANTS = ("plain_matched", "plain_prompt")


# --------------------------------------------------------------------------- clocks
class Stamps:
    """A transformers-style streamer that timestamps each call (wall and process CPU time).

    ``generate`` calls ``put(prompt)`` once the prompt is read and the first logits exist,
    ``put(token)`` as each token is chosen (before the stream takes it) and ``end()`` after
    the last step; the plain loop calls the same methods at the same points.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self._now()
        self.marks: list[tuple[float, float]] = []  # put(prompt), put(token 1..n), end()

    def _now(self) -> tuple[float, float]:
        synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def put(self, value) -> None:
        self.marks.append(self._now())

    def end(self) -> None:
        self.marks.append(self._now())

    def figures(self) -> dict:
        """prefill (start -> first logits), decode total, and per-step times, per clock."""
        out = {}
        for c, name in enumerate(("wall", "cpu")):
            t = [m[c] for m in self.marks]
            # step s (1-based) = the stream taking token s and producing the next logits,
            # plus choosing token s+1: from put(token s) to put(token s+1) (or end()).
            steps = [b - a for a, b in zip(t[1:], t[2:])]
            out[name] = {
                "prefill_s": t[0] - self.start[c],
                "decode_s": t[-1] - t[0],
                "select_first_s": t[1] - t[0] if len(t) > 1 else 0.0,
                "steps_s": steps,
            }
        return out


class StreamProbe:
    """Wraps the methods of HMT's decode loop (``hmt.generation._DecodeBatch``) and the memory
    search to log what each decode step did; nothing in hmt is changed.

    Per step: its kind and the time spent in each wrapped call. ``encode`` (the incremental
    encoding step), ``search`` (memory search), ``prefix`` ([P|sensory|E] run again, with
    or without keeping its KV cache), ``cached`` (the batched KV-cached step), ``close``
    (writing m_n), ``search_once`` (fast mode: encoding + search once per segment)."""

    NAMES = ("_cached_step", "_close", "_encode", "_recompute", "_reopen", "_search_once")
    PARTS = {"encode": ("_encode",), "search": ("memory_search",), "prefix": ("_recompute", "_reopen"),
             "cached": ("_cached_step",), "close": ("_close",), "search_once": ("_search_once",)}

    def __init__(self, model, device: torch.device):
        from hmt import generation

        self.cls = generation._DecodeBatch
        self.model, self.device = model, device
        self.events: list[tuple[str, int, float, float, float, float]] = []  # name, depth, start/end wall, cpu
        self.depth = 0
        self.originals = {}

    def _wrap(self, name, fn):
        probe = self

        def wrapper(*args, **kwargs):
            depth = probe.depth
            probe.depth += 1
            synchronize(probe.device)
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(probe.device)
                probe.events.append((name, depth, w0, time.perf_counter(), c0, time.process_time()))
                probe.depth -= 1

        return wrapper

    def install(self) -> None:
        for name in self.NAMES:
            self.originals[name] = getattr(self.cls, name)
            setattr(self.cls, name, self._wrap(name, self.originals[name]))
        search = self.model.memory_search
        search.forward = self._wrap("memory_search", type(search).forward.__get__(search))

    def remove(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.cls, name, fn)
        self.originals.clear()
        self.model.memory_search.__dict__.pop("forward", None)

    def reset(self) -> None:
        self.events = []

    def classify(self, stamps: "Stamps") -> list[dict]:
        """Per decode step: its kind and, per clock, the seconds in each part (and ``other``:
        the step minus its top-level calls: token choice, bookkeeping, packing, LM head)."""
        marks = stamps.marks
        steps = []
        for s in range(1, len(marks) - 1):
            w0, w1 = marks[s][0], marks[s + 1][0]
            inside = [e for e in self.events if e[2] >= w0 and e[3] <= w1]
            top = {e[0] for e in inside if e[1] == 0}
            if "_close" in top:
                kind = "close + reopen" if "_reopen" in top else "close + recompute"
            elif "_reopen" in top:
                kind = "P final: reopen"
            elif "_recompute" in top:
                kind = "recompute"
            elif "_cached_step" in top:
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


class DecodeClock:
    """Decode time of a (batched) ``generate``: from the end of the decode set-up (the
    open segments' prefill) to the end of its last step; wraps ``hmt.generation._DecodeBatch``."""

    def __init__(self, device: torch.device):
        from hmt import generation

        self.cls, self.device = generation._DecodeBatch, device
        self.marks: list[tuple[float, float]] = []

    def _now(self) -> tuple[float, float]:
        synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def __enter__(self):
        clock = self
        self.init, self.advance = self.cls.__init__, self.cls.advance

        def init(batch, *args, **kwargs):
            clock.init(batch, *args, **kwargs)
            clock.marks.append(clock._now())

        def advance(batch, *args, **kwargs):
            clock.advance(batch, *args, **kwargs)
            clock.marks.append(clock._now())

        self.cls.__init__, self.cls.advance = init, advance
        return self

    def __exit__(self, *exc):
        self.cls.__init__, self.cls.advance = self.init, self.advance

    def figures(self) -> dict:
        t0, t1 = self.marks[0], self.marks[-1]
        return {"wall": {"decode_s": t1[0] - t0[0]}, "cpu": {"decode_s": t1[1] - t0[1]}, "steps": len(self.marks) - 1}


# --------------------------------------------------------------------------- variants

def run_interleaved(runners: dict, steps: int, repeats: int, what: str, describe) -> dict:
    """Warm every variant up briefly, then run each ``repeats`` times for ``steps`` tokens in a
    rotating order (load from other processes hits all variants alike); figures per variant."""
    variants = list(runners)
    runs = {v: [] for v in variants}
    with torch.no_grad():
        for v in variants:  # every code path (close, recompute, cached) once, briefly
            runners[v](min(4, steps))
        for rep in range(repeats):
            order = variants[rep % len(variants):] + variants[: rep % len(variants)]
            line = []
            for v in order:
                gc.collect()
                fig = runners[v](steps)
                runs[v].append(fig)
                line.append(describe(v, fig))
            print(f"  rep {rep + 1}/{repeats} {what}: " + ", ".join(line), flush=True)
    return runs

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


def run_plain(backbone, prompt_ids, steps: int, device):
    """Greedy decoding with the backbone's own KV cache: L steps, each one token per row in,
    logits out (``prompt_ids (B, n)``: B rows of the same length decode as one batch)."""
    from hmt import backbone as bb
    from hmt import kv_cache

    name = kv_cache.cache_argument(bb.unwrap(backbone))
    stamps = Stamps(device)
    out = backbone(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
    cache, logits = out[name], out.logits[:, -1]
    stamps.put(prompt_ids)
    tokens = []
    for _ in range(steps):
        token = logits.float().argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(token)
        stamps.put(token)
        out = backbone(input_ids=token, use_cache=True, **{name: cache})
        cache, logits = out[name], out.logits[:, -1]
    stamps.end()
    fig = stamps.figures()
    chosen = torch.cat(tokens, 1) if tokens else prompt_ids.new_zeros(prompt_ids.shape[0], 0)
    fig["tokens"] = chosen[0].tolist() if chosen.shape[0] == 1 else chosen.tolist()
    fig["context_end"] = cache.get_seq_length()
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


# --------------------------------------------------------------------------- part 1
def latency(args, device, dtype) -> dict:
    import hmt
    from hmt import backbone as bb

    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
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
    print(f"\n=== 1. Decode latency over one segment ===\n"
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

    probe = StreamProbe(model, device)
    probe.install()
    runners = {
        "hmt_exact": lambda n: run_hmt(model, open_ids, prefix_state, n, True, device, probe),
        "hmt_fast": lambda n: run_hmt(model, open_ids, prefix_state, n, False, device, probe),
        "plain_matched": lambda n: run_plain(backbone, ids[:, T - (k + 1):], n, device),
        "plain_prompt": lambda n: run_plain(backbone, ids, n, device),
    }
    try:
        runs = run_interleaved(
            {v: runners[v] for v in variants}, L, args.repeats, "ms/token wall/cpu",
            lambda v, fig: f"{v} {1e3 * fig['wall']['decode_s'] / L:.1f}/{1e3 * fig['cpu']['decode_s'] / L:.1f}")
    finally:
        probe.remove()

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


# --------------------------------------------------------------------------- part 2
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
    cmd = [sys.executable, os.path.join(HERE, "generation.py"), "--memory-worker", "--length", str(length),
           "--ids-file", ids_file, "--device", args.device, "--dtype", args.dtype, "-L", str(args.segment_length),
           "-j", str(args.representation_length), "-k", str(args.sensory), "-N", str(args.num_memory),
           "--gen-tokens", str(args.gen_tokens), "--memory-mode", args.memory_mode, "--threads", str(args.threads)]
    if args.backbone:
        cmd += ["--backbone", args.backbone]
    return cmd


def memory(args, device) -> dict:
    import hmt

    _, tokenizer = hmt.load_backbone(args.backbone)
    lengths = [args.short_tokens, args.long_tokens]
    print(f"\n=== 2. Memory stays flat ===\n{args.long_tokens}- vs {args.short_tokens}-token prompt (Python stdlib "
          f"source), then {args.gen_tokens} generated tokens ({args.memory_mode} mode), each in its own subprocess, "
          f"{args.threads} thread(s), device {device}", flush=True)
    if args.malloc_mmap_threshold:
        print(f"  workers run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (allocator diagnosis)")
    ids = document_ids(tokenizer, max(lengths))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = os.path.join(tmp, "ids.pt")
        torch.save(ids, ids_file)
        procs = []
        order = sorted(lengths, reverse=True)  # longest first
        pending = list(order)
        while pending or procs:
            while pending and len(procs) < args.jobs:
                n = pending.pop(0)
                logs = [open(os.path.join(tmp, f"{n}.{s}"), "w+") for s in ("out", "err")]
                env = dict(os.environ)
                if args.malloc_mmap_threshold:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
                procs.append((n, subprocess.Popen(worker_command(args, n, ids_file), stdout=logs[0], stderr=logs[1],
                                                  text=True, env=env), logs, time.perf_counter()))
                print(f"  started {n}-token run (pid {procs[-1][1].pid})", flush=True)
            time.sleep(0.5)
            for item in list(procs):
                n, proc, logs, start = item
                if proc.poll() is None:
                    continue
                out, err = [(f.seek(0), f.read(), f.close())[1] for f in logs]
                lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    tail = (err or out)[-2000:]
                    print(f"  {n}-token run FAILED (exit {proc.returncode})\n{tail}", flush=True)
                    results[n] = {"tokens": n, "error": tail}
                else:
                    r = json.loads(lines[-1][len("RESULT "):])
                    results[n] = r
                    print(f"  {n}-token run done in {time.perf_counter() - start:.0f}s: peak {r['generate_peak_rss_bytes'] / MiB:.1f} "
                          f"MiB, working {r['working_bytes'] / MiB:.1f} MiB", flush=True)
                procs.remove(item)

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


# --------------------------------------------------------------------------- part 3
def batched(args, device, dtype) -> dict:
    """HMT's batched decoding against the same rows one at a time, and the plain backbone's own
    batched KV-cached decoding as the reference."""
    import hmt
    from hmt import MemoryState
    from hmt import backbone as bb

    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    backbone, tokenizer = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    torch.manual_seed(0)
    model = hmt_from_args(backbone, args)
    config = model.config
    L, j, k, B = config.segment_length, config.representation_length, config.sensory_memory_size, args.batch
    segments = max(1, -(-args.prompt_tokens // L))
    T = segments * L
    prompts = document_ids(tokenizer, B * T).to(device).view(B, T)  # B different prompts of the same text
    print(f"\n=== 3. Batched decoding ===\nbackbone {type(bb.unwrap(backbone)).__name__} on {device}, {dtype}, "
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("latency", "batch", "memory"), default=["latency", "batch", "memory"])
    p.add_argument("--backbone", default=None, help="backbone name or path (default: SmolLM2-135M)")
    p.add_argument("--segment-length", "-L", type=int, default=256)
    p.add_argument("--representation-length", "-j", type=int, default=128)
    p.add_argument("--sensory", "-k", type=int, default=32)
    p.add_argument("--num-memory", "-N", type=int, default=300)
    p.add_argument("--prompt-tokens", type=int, default=1024,
                   help="latency: prompt length, rounded up to whole segments (default 1024)")
    p.add_argument("--repeats", type=int, default=3, help="latency: timed repetitions of each variant (interleaved)")
    p.add_argument("--batch", type=int, default=4, help="batch: rows decoded together (default 4)")
    p.add_argument("--batch-repeats", type=int, default=2, help="batch: timed repetitions of each variant")
    p.add_argument("--batch-modes", nargs="+", choices=("exact", "fast"), default=["exact", "fast"],
                   help="batch: HMT decoding modes to time")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="headline clock of the latency part (auto: cpu on a CPU device, wall on CUDA)")
    p.add_argument("--long-tokens", type=int, default=100_000, help="memory: the long prompt (default 100000)")
    p.add_argument("--short-tokens", type=int, default=4096, help="memory: the short prompt (default 4096)")
    p.add_argument("--gen-tokens", type=int, default=1000, help="memory: tokens generated after each prompt")
    p.add_argument("--memory-mode", choices=("exact", "fast"), default="exact",
                   help="memory: exact_retrieval=True (default) or False for the generated tokens")
    p.add_argument("--jobs", type=int, default=1, help="memory: subprocesses at once (default 1)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="memory: run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: blocks this large are "
                   "mmapped and handed back on free, so freed heap memory is not retained (diagnosis)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: L=64 j=32 k=8, 128-token prompt, 1 repetition; memory 2048 vs 512 tokens, 64 generated")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    p.add_argument("--merge", action="store_true",
                   help="with --json: keep the parts of an existing file that this run does not measure")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.segment_length, args.representation_length, args.sensory = 64, 32, 8
        args.prompt_tokens, args.repeats, args.batch_repeats = 128, 1, 1
        args.long_tokens, args.short_tokens, args.gen_tokens = 2048, 512, 64
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print("RESULT " + json.dumps(memory_worker(args)), flush=True)
        return {"ok": True}
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype)
    payload = {}
    run = {"command": "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "args": vars(args), "environment": environment(device)}
    for part, measure in (("latency", lambda: latency(args, device, dtype)), ("batch", lambda: batched(args, device, dtype)),
                          ("memory", lambda: memory(args, device))):
        if part in args.parts:
            payload[part] = {**measure(), "run": run}
    if args.merge and args.json and os.path.exists(args.json):  # read at the end: runs side by side both merge
        with open(args.json) as f:
            payload = {**json.load(f), **payload}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
