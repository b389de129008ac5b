"""Throughput of HMT against the plain backbone on the same disjoint L-token segments.

Default setting (the issue's): SmolLM2-135M, L=256, j=128, k=32, N=300, a 4096-token
document of real text (Python standard-library source), torch.no_grad, float32. Every
repetition runs the three variants back to back in a rotating order (interleaved), so
that load from other processes hits all of them alike; medians are reported.

Variants:
  hmt           model(ids, labels=ids, return_logits=False, memory_state=new)   memory on
  plain_model   model(ids, labels=ids, return_logits=False, use_memory=False)   same L segments
  plain_direct  backbone(input_ids=chunk).logits + the same cross-entropy, per L chunk

All three compute the LM head on exactly the L segment positions of every segment and
the same summed next-token NLL (``--mode logits`` instead keeps the full logits and
scores nothing). The spec's unavoidable ratio is (k+L+2 + j+2) / L = config.cost_ratio.

Clocks: wall time, and this process's CPU time (time.process_time). On a CPU shared with
other processes the wall time of a 20-s run swings by 2x; with --threads 1 the CPU time
does not, so on a CPU device the headline ratio and the breakdown use CPU time
(--clock wall to change). tokens/s is always from wall time.

Breakdown: forward hooks on the backbone's decoder stack, its LM head and HMT's memory
modules (no change to hmt) time the encoding pass, the augmented pass, the LM head, the
loss, the memory search, and the rest ("other": embedding lookups, packing, memory
state updates, Python).

    python benchmarks/throughput.py                 # default: 1 thread, ~2.5 min, steady ratios
    python benchmarks/throughput.py --threads 2     # both cores (only on an otherwise idle machine)
    python benchmarks/throughput.py --quick         # smoke run, ~20 s
    python benchmarks/throughput.py --json out.json --profile
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import hmt
from hmt import HMT
from hmt import backbone as bb

from hmt.arguments import run
from _common import (add_json_argument, add_model_arguments, check_json, make_parser, non_negative_int, positive_int, document_ids, environment, hmt_from_args, median, parse_dtype, pick_device,
                     synchronize, table, write_json)

IGNORE_INDEX = -100
VARIANTS = ("hmt", "plain_model", "plain_direct")


# --------------------------------------------------------------------------- timing hooks
class Breakdown:
    """Times the backbone's decoder stack and LM head, and HMT's memory modules, via hooks."""

    def __init__(self, model: HMT, device: torch.device, clock: str = "wall"):
        self.device = device
        self.model = model
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.positions: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}
        self._in_encoder = False
        self._handles = []
        self._ce = None

    def reset(self) -> dict:
        snap = {"seconds": dict(self.seconds), "calls": dict(self.calls), "positions": dict(self.positions)}
        self.seconds.clear(), self.calls.clear(), self.positions.clear()
        return snap

    def _tic(self, key: str) -> None:
        synchronize(self.device)
        self._start[key] = self.clock()

    def _toc(self, key: str, positions: int = 0) -> None:
        synchronize(self.device)
        self.seconds[key] += self.clock() - self._start.pop(key)
        self.calls[key] += 1
        self.positions[key] += positions

    def install(self) -> None:
        stack = bb.decoder_stack(self.model.backbone)
        head = bb.unwrap(self.model.backbone).get_output_embeddings()

        def dec_key():
            return "encoding_pass" if self._in_encoder else "backbone_pass"

        def dec_pre(mod, args, kwargs):
            self._tic(dec_key())

        def dec_post(mod, args, kwargs, out):
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids")
            x = embeds if embeds is not None else ids
            self._toc(dec_key(), int(x.shape[0] * x.shape[1]) if x is not None else 0)

        def enc_pre(mod, args):
            self._in_encoder = True
            self._tic("encoder_module")

        def enc_post(mod, args, out):
            self._toc("encoder_module")
            self._in_encoder = False

        def simple(key):
            def pre(mod, args):
                self._tic(key)

            def post(mod, args, out):
                n = args[0].shape[:-1].numel() if args and torch.is_tensor(args[0]) else 0
                self._toc(key, int(n))

            return pre, post

        self._handles += [
            stack.register_forward_pre_hook(dec_pre, with_kwargs=True),
            stack.register_forward_hook(dec_post, with_kwargs=True),
            self.model.representation_encoder.register_forward_pre_hook(enc_pre),
            self.model.representation_encoder.register_forward_hook(enc_post),
        ]
        for key, module in (("lm_head", head), ("memory_search", self.model.memory_search)):
            pre, post = simple(key)
            self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

        self._ce = F.cross_entropy
        original = self._ce

        def timed_ce(*args, **kwargs):
            self._tic("loss")
            out = original(*args, **kwargs)
            self._toc("loss")
            return out

        F.cross_entropy = timed_ce  # hmt.model calls F.cross_entropy through the module

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._ce is not None:
            F.cross_entropy = self._ce


# --------------------------------------------------------------------------- the variants
def run_hmt(model: HMT, ids: torch.Tensor, mode: str):
    state = model.new_memory(ids.shape[0])
    if mode == "score":
        out = model(ids, labels=ids, return_logits=False, memory_state=state)
        return float(out.nll_sum.sum())
    out = model(ids, return_logits=True, memory_state=state)
    return float(out.logits[0, -1, 0])


def run_plain_model(model: HMT, ids: torch.Tensor, mode: str):
    if mode == "score":
        out = model(ids, labels=ids, return_logits=False, use_memory=False)
        return float(out.nll_sum.sum())
    out = model(ids, return_logits=True, use_memory=False)
    return float(out.logits[0, -1, 0])


def run_plain_direct(backbone, ids: torch.Tensor, L: int, mode: str):
    """The plain backbone called directly on each disjoint L-token chunk."""
    B, T = ids.shape
    targets = torch.cat([ids[:, 1:], ids.new_full((B, 1), IGNORE_INDEX)], dim=1)
    nll = ids.new_zeros((), dtype=torch.float32)
    kept = []
    for s in range(0, T, L):
        logits = backbone(input_ids=ids[:, s : s + L], use_cache=False).logits
        if mode == "score":
            nll = nll + F.cross_entropy(
                logits.flatten(0, 1).float(), targets[:, s : s + L].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        else:
            kept.append(logits)
    if mode == "score":
        return float(nll)
    return float(torch.cat(kept, dim=1)[0, -1, 0])


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = make_parser(__doc__)
    add_model_arguments(p, threads_help="torch.set_num_threads on CPU (default 1: on a shared machine two threads "
                        "stall each other at every barrier and the timings swing 2-10x; 0 = torch's default)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="document length in tokens (default 4096)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions of each variant (interleaved)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed warm-up rounds on a 2-segment document")
    p.add_argument("--mode", choices=("score", "logits"), default="score",
                   help="score: labels=ids, return_logits=False (default); logits: keep full logits")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="clock of the headline ratio and the breakdown: wall time, or this process's CPU "
                   "time (robust to other processes on a shared CPU; best with --threads 1). "
                   "auto: cpu on a CPU device, wall on CUDA")
    p.add_argument("--no-breakdown", action="store_true", help="no timing hooks (on CUDA they synchronise)")
    p.add_argument("--profile", action="store_true", help="also run torch.profiler on one HMT document")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 512 tokens, 1 repetition")
    add_json_argument(p)
    args = p.parse_args(argv)
    check_json(p, args)
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 512), 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    torch.manual_seed(0)

    t0 = time.perf_counter()
    backbone, tokenizer = hmt.load_backbone(args.backbone, dtype=dtype, device=device)
    model = hmt_from_args(backbone, args)
    config = model.config
    load_s = time.perf_counter() - t0
    ids = document_ids(tokenizer, args.tokens).to(device)
    T, L, j, k = ids.shape[1], config.segment_length, config.representation_length, config.sensory_memory_size
    S = -(-T // L)
    print(f"backbone {type(bb.unwrap(backbone)).__name__} ({sum(p.numel() for p in backbone.parameters())/1e6:.1f}M params), "
          f"loaded in {load_s:.1f}s on {device}, {dtype}, torch threads {torch.get_num_threads()}")
    print(f"document: {T} tokens of Python stdlib source = {S} segments; L={L}, j={j}, k={k}, N={config.num_memory_embeddings}; "
          f"mode={args.mode}, repeats={args.repeats}, headline clock: {clock}")

    runners = {
        "hmt": lambda x: run_hmt(model, x, args.mode),
        "plain_model": lambda x: run_plain_model(model, x, args.mode),
        "plain_direct": lambda x: run_plain_direct(backbone, x, L, args.mode),
    }
    breakdown = None if args.no_breakdown else Breakdown(model, device, clock)
    if breakdown:
        breakdown.install()

    times = {"wall": {v: [] for v in VARIANTS}, "cpu": {v: [] for v in VARIANTS}}
    parts = {v: [] for v in VARIANTS}
    checks = {}
    with torch.no_grad():
        warm = ids[:, : min(T, 2 * L)]
        for _ in range(args.warmup):
            for v in VARIANTS:
                runners[v](warm)
        if breakdown:
            breakdown.reset()
        for rep in range(args.repeats):
            order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]  # rotate who goes first
            for v in order:
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                checks[v] = runners[v](ids)
                synchronize(device)
                times["wall"][v].append(time.perf_counter() - wall)
                times["cpu"][v].append(time.process_time() - cpu)
                if breakdown:
                    parts[v].append(breakdown.reset())
            print(f"  rep {rep + 1}/{args.repeats}: "
                  + ", ".join(f"{v} {times['wall'][v][-1]:.2f}s wall / {times['cpu'][v][-1]:.2f}s cpu" for v in order),
                  flush=True)
    if breakdown:
        breakdown.remove()

    # ------------------------------------------------------------------ figures
    med = {c: {v: median(times[c][v]) for v in VARIANTS} for c in ("wall", "cpu")}
    tokps = {v: T / med["wall"][v] for v in VARIANTS}
    spec_ratio = config.cost_ratio
    # backbone positions HMT really runs: the first segment has no sensory memory and no
    # encoding pass (empty cache); later ones [P|k sensory|L_s|P] plus [T|min(j, L_s)|T]
    seg_lens = [min(L, T - s * L) for s in range(S)]
    hmt_positions = seg_lens[0] + 2 + sum(min(k, seg_lens[s - 1]) + n + 2 + min(j, n) + 2 for s, n in enumerate(seg_lens) if s)
    doc_ratio = hmt_positions / T

    print("\nThroughput (median over repetitions; tokens/s from wall time)")
    print(table(["variant", "median wall s", "min", "max", "tokens/s", "median cpu s", "cpu tokens/s"],
                [[v, med["wall"][v], min(times["wall"][v]), max(times["wall"][v]), tokps[v],
                  med["cpu"][v], T / med["cpu"][v]] for v in VARIANTS]))

    rows, result_ratios = [], {}
    for c in ("wall", "cpu"):
        for base in ("plain_model", "plain_direct"):
            paired = [h / p for h, p in zip(times[c]["hmt"], times[c][base])]
            measured = median(paired)
            result_ratios[f"{c}:{base}"] = {
                "hmt_over_plain_paired_median": measured,
                "hmt_over_plain_paired_all": paired,
                "hmt_over_plain_of_medians": med[c]["hmt"] / med[c][base],
                "spec_unavoidable": spec_ratio,
                "measured_over_spec": measured / spec_ratio,
                "document_unavoidable": doc_ratio,
                "measured_over_document": measured / doc_ratio,
            }
            rows.append([c, base, measured, min(paired), max(paired), spec_ratio, measured / spec_ratio, doc_ratio,
                         measured / doc_ratio])
    print("\nHMT time / plain time (median of the per-repetition paired ratios)")
    print(table(["clock", "baseline", "measured", "min", "max", "spec (k+L+2+j+2)/L", "measured/spec",
                 "doc-exact", "measured/doc"], rows))
    print(f"  spec = config.cost_ratio = ({k}+{L}+2+{j}+2)/{L} = {spec_ratio:.3f}; doc-exact counts the {hmt_positions} "
          f"backbone positions HMT runs for {T} tokens (first segment: no sensory, no encoding pass).")
    headline = result_ratios[f"{clock}:plain_model"]["measured_over_spec"]
    target_ok = headline <= 1.1
    print(f"  target measured/spec <= 1.1 ({clock} clock, vs plain_model): {'MET' if target_ok else 'NOT MET'} ({headline:.3f})")
    if args.mode == "score":
        rel = abs(checks["plain_model"] - checks["plain_direct"]) / max(abs(checks["plain_direct"]), 1e-9)
        print(f"  sanity: summed NLL plain_model {checks['plain_model']:.2f} vs plain_direct {checks['plain_direct']:.2f} "
              f"(rel diff {rel:.1e}); HMT {checks['hmt']:.2f} (untrained memory parameters)")

    breakdown_figures = {}
    if breakdown:
        keys = ["encoding_pass", "encoder_module", "backbone_pass", "lm_head", "loss", "memory_search"]
        for v in VARIANTS:
            snap = {key: median([p["seconds"].get(key, 0.0) for p in parts[v]]) for key in keys}
            calls = parts[v][0]["calls"] if parts[v] else {}
            positions = parts[v][0]["positions"] if parts[v] else {}
            total = med[clock][v]
            accounted = snap["encoder_module"] + snap["backbone_pass"] + snap["lm_head"] + snap["loss"] + snap["memory_search"]
            breakdown_figures[v] = {
                "clock": clock, "total_s": total, **{f"{key}_s": snap[key] for key in keys},
                "encoder_packing_s": max(snap["encoder_module"] - snap["encoding_pass"], 0.0),
                "other_s": total - accounted, "calls": calls, "positions": positions,
            }
        print(f"\nTime breakdown per document ({clock} clock, medians; s and share of the variant's total)")
        names = [("encoding_pass", "encoding pass: decoder on [T|E[:j]|T]"),
                 ("encoder_packing", "encoding: prompt/packing around it"),
                 ("backbone_pass", "augmented / plain pass: decoder"),
                 ("lm_head", "LM head on segment positions"),
                 ("loss", "cross-entropy"),
                 ("memory_search", "memory search (W_q, W_k, softmax)"),
                 ("other", "other (embeddings, packing, state, Python)")]
        rows = []
        for key, label in names:
            row = [label]
            for v in VARIANTS:
                sec = breakdown_figures[v][f"{key}_s"]
                row.append(f"{sec:.3f} ({100 * sec / breakdown_figures[v]['total_s']:.1f}%)")
            rows.append(row)
        rows.append(["total"] + [f"{breakdown_figures[v]['total_s']:.3f}" for v in VARIANTS])
        print(table(["part", *VARIANTS], rows))

        # per-position cost of each kind of decoder pass: is HMT's extra time its own work?
        hb, pb = breakdown_figures["hmt"], breakdown_figures["plain_model"]
        kinds = {"plain pass": (pb, "backbone_pass"), "HMT augmented pass": (hb, "backbone_pass"),
                 "HMT encoding pass": (hb, "encoding_pass")}
        per_pos, rows = {}, []
        for name, (fig, key) in kinds.items():
            calls, pos = fig["calls"].get(key, 0), fig["positions"].get(key, 0)
            per_pos[name] = fig[f"{key}_s"] / max(pos, 1)
            rows.append([name, calls, pos, 1e3 * per_pos[name], per_pos[name] / max(per_pos["plain pass"], 1e-12)])
        print(f"\nDecoder cost per position ({clock} clock), per kind of pass")
        print(table(["pass", "calls", "positions", "ms / position", "vs plain"], rows))
        # time model: HMT if every decoder position cost what a plain one does, plus its own head and loss
        ideal = per_pos["plain pass"] * (hb["positions"].get("backbone_pass", 0) + hb["positions"].get("encoding_pass", 0)) \
            + hb["lm_head_s"] + hb["loss_s"]
        plain_total = med[clock]["plain_model"]
        print(f"  HMT at the plain pass's per-position decoder cost, plus its LM head and loss: {ideal:.2f}s = "
              f"{ideal / plain_total:.3f}x plain; measured {med[clock]['hmt']:.2f}s = {med[clock]['hmt'] / ideal:.3f}x that. "
              "(The spec ratio counts positions only; the LM head and loss, the same work in both, dilute it.)")
        breakdown_figures["time_model"] = {"per_position_s": per_pos, "hmt_ideal_s": ideal,
                                           "hmt_ideal_over_plain": ideal / plain_total,
                                           "measured_over_ideal": med[clock]["hmt"] / ideal}

    profile_rows = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            runners["hmt"](ids)
            synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("\ntorch.profiler, one HMT document, top operators by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
        profile_rows = [
            {"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:30]
        ]

    payload = {
        "args": vars(args),
        "environment": environment(device),
        "config": config.to_dict(),
        "document_tokens": T,
        "segments": S,
        "hmt_backbone_positions": hmt_positions,
        "headline_clock": clock,
        "times_s": times,
        "median_s": med,
        "tokens_per_s": tokps,
        "ratios": result_ratios,
        "target_measured_over_spec_le_1_1": target_ok,
        "breakdown": breakdown_figures,
        "checks": checks,
        "profile_top_ops": profile_rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    sys.exit(run(lambda argv: 0 if main(argv) else 1))
