"""Helpers shared by the generation benchmarks (generation_latency.py, generation_batch.py,
generation_memory.py): their flags, clocks around decoding, the plain backbone's greedy loop,
interleaved repetitions, and a clock on HMT's decoder (through hmt.generation.watch_decoding).

Import it after setting OMP_WAIT_POLICY (it imports torch).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Callable

import torch

from _common import (add_json_argument, add_model_arguments, check_json, environment, make_parser, pick_device,
                     positive_int, synchronize, write_json)


# --------------------------------------------------------------------------- flags and output
def parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every generation benchmark takes: the model's, ``--quick``, ``--json``, ``--merge``."""
    p = make_parser(doc)
    add_model_arguments(p)
    p.add_argument("--quick", action="store_true", help=quick_help)
    add_json_argument(p)
    p.add_argument("--merge", action="store_true",
                   help="with --json: keep the parts of an existing file that this run does not measure")
    return p


def add_prompt_arguments(p: argparse.ArgumentParser, prompt_help: str) -> None:
    """``--prompt-tokens`` and ``--clock``, for the benchmarks that time decoding."""
    p.add_argument("--prompt-tokens", type=positive_int, default=1024, help=prompt_help)
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="headline clock (auto: cpu on a CPU device, wall on CUDA)")


def parse(p: argparse.ArgumentParser, argv=None, **quick) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, a small model (L=64, j=32, k=8) and the settings ``quick``."""
    args = p.parse_args(argv)
    check_json(p, args)
    if args.quick:
        args.segment_length, args.representation_length, args.sensory = 64, 32, 8
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def headline_clock(args: argparse.Namespace, device: torch.device) -> str:
    """On a shared CPU this process's CPU time with one thread is the steadier figure; wall on CUDA."""
    return args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")


def run_part(part: str, script: str, measure: Callable[[argparse.Namespace, torch.device], dict],
             args: argparse.Namespace, argv=None) -> dict:
    """Run ``measure(args, device)`` and write ``{part: its figures + how they were run}`` to
    ``--json`` (merged with ``--merge``), so that the three generation benchmarks can share one
    file (``results/generation_cpu.json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    figures = measure(args, device)
    run = {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
           "args": vars(args), "environment": environment(device)}
    payload = {part: {**figures, "run": run}}
    write_json(args.json, payload, merge=args.merge)
    return payload


# --------------------------------------------------------------------------- clocks
def now(device: torch.device) -> tuple[float, float]:
    """(wall, this process's CPU time), after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter(), time.process_time()


class Stamps:
    """A transformers-style streamer that timestamps each call (wall and process CPU time).

    ``generate`` calls ``put(prompt)`` once the prompt is read and the first logits exist,
    ``put(token)`` as each token is chosen (before the stream takes it) and ``end()`` after
    the last step; the plain loop calls the same methods at the same points.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start = now(device)
        self.marks: list[tuple[float, float]] = []  # put(prompt), put(token 1..n), end()

    def put(self, value) -> None:
        self.marks.append(now(self.device))

    def end(self) -> None:
        self.marks.append(now(self.device))

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


class DecodeClock:
    """Decode time of a (batched) ``generate``: from the end of the decoder's set-up (the open
    segments' prefill) to the end of its last step. A context manager: it times the decoders
    built inside its block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[float, float]] = []

    def _stamp(self, part: str, event: str) -> None:
        if event == "end" and part in ("setup", "step"):  # the decoder set up, a decode step done
            self.marks.append(now(self.device))

    def __enter__(self) -> "DecodeClock":
        from hmt import generation

        self._scope = generation.watch_decoding(self._stamp)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._scope.__exit__(*exc)

    def figures(self) -> dict:
        t0, t1 = self.marks[0], self.marks[-1]
        return {"wall": {"decode_s": t1[0] - t0[0]}, "cpu": {"decode_s": t1[1] - t0[1]}, "steps": len(self.marks) - 1}


# --------------------------------------------------------------------------- running variants
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


def run_plain(backbone, prompt_ids: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Greedy decoding with the backbone's own KV cache: ``steps`` steps, each one token per row
    in, logits out (``prompt_ids (B, n)``: B rows of the same length decode as one batch)."""
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
