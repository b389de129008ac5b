"""Helpers shared by the benchmarks: real text, devices, synchronisation, tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
import resource
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import torch
from hmt.arguments import Parser, check_output_file, device_name, non_negative_int, positive_int

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def stdlib_text(min_chars: int) -> str:
    """Real text: the Python standard library's own source files, concatenated in a fixed order."""
    root = os.path.dirname(os.__file__)
    pieces, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            pieces.append(text)
            total += len(text)
            if total >= min_chars:
                return "\n".join(pieces)
    return "\n".join(pieces)


def document_ids(tokenizer, num_tokens: int) -> torch.Tensor:
    """``(1, num_tokens)`` token ids of real text (Python stdlib source)."""
    chars = num_tokens * 6
    while True:
        ids = tokenizer(stdlib_text(chars), return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] >= num_tokens:
            return ids[:, :num_tokens].contiguous()
        chars *= 2


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def write_json(path: Optional[str], payload: dict[str, Any], merge: bool = False) -> None:
    """Write ``payload`` to ``path`` (nothing if no path); ``merge``: keep the top-level keys of an
    existing file that ``payload`` does not have (read here, at the end, so that runs side by side
    both merge)."""
    if not path:
        return
    if merge and os.path.exists(path):
        with open(path) as f:
            payload = {**json.load(f), **payload}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    print(f"\nwrote {path}")


# --------------------------------------------------------------------------- process memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM and ru_maxrss) for this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hmt_from_args(backbone, args):
    """HMT (eval mode) around ``backbone`` from the benchmarks' shared flags (--segment-length,
    --representation-length, --sensory, --num-memory)."""
    from hmt import HMT, HMTConfig

    config = HMTConfig(segment_length=args.segment_length, representation_length=args.representation_length,
                       sensory_memory_size=args.sensory, num_memory_embeddings=args.num_memory)
    return HMT(backbone, config).eval()


class MemoryWatch:
    """Process (and CUDA) memory of one measured block, above what loading left resident.

    Call :meth:`loaded` once the model is resident and warmed up, run the block, then
    :meth:`figures`: the block's peak is the kernel's high-water mark, reset at ``loaded``
    (if the reset is not possible, the process-wide maximum).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def loaded(self) -> None:
        import gc

        gc.collect()
        self.load_peak, self.after_load, self.was_reset = ru_maxrss_bytes(), current_rss_bytes(), reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_after_load = torch.cuda.memory_allocated(self.device)

    def peak(self, high_water: Optional[int] = None) -> int:
        """The block's peak RSS; ``high_water``: a reading to use instead of ru_maxrss."""
        maxrss = high_water if high_water is not None else ru_maxrss_bytes()
        return maxrss if self.was_reset else max(maxrss, self.after_load)

    def figures(self, phase: str, peak: Optional[int] = None) -> dict:
        """``{phase}_peak_rss_bytes``, working memory above after-load, and the CUDA figures."""
        peak = self.peak() if peak is None else peak
        out = {"load_peak_rss_bytes": self.load_peak, "rss_after_load_bytes": self.after_load,
               f"{phase}_peak_rss_bytes": peak, "working_bytes": peak - self.after_load, "hwm_reset": self.was_reset}
        if self.device.type == "cuda":
            cuda_peak = torch.cuda.max_memory_allocated(self.device)
            out.update(cuda_max_allocated_bytes=cuda_peak, cuda_after_load_bytes=self.cuda_after_load,
                       cuda_working_bytes=cuda_peak - self.cuda_after_load)
        return out


# --------------------------------------------------------------------------- shared flags
def make_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as the description; a bad flag is one
    line and exit status 2 (:class:`hmt.arguments.Parser`)."""
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


LM_ADAPTER = "smollm2-135m-lm"  # the adapter the memory benchmarks' committed results were measured on


def add_adapter_argument(parser: argparse.ArgumentParser, flag: str = "--adapter", what: str = "adapter") -> None:
    """``flag`` naming an adapter, by default :data:`LM_ADAPTER` (shipped as smollm2-135m, the
    default adapter, up to 0.2), so that the commands in benchmarks/README.md reproduce their figures."""
    parser.add_argument(flag, default=LM_ADAPTER, help=f"{what} (default: {LM_ADAPTER}, the language-model adapter these "
                                                       "results were measured on, shipped as smollm2-135m up to 0.2)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """``--json PATH`` and ``--overwrite`` (an existing file is replaced only when asked)."""
    parser.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def check_json(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything runs, a ``--json`` that cannot be written or exists (unless
    ``--overwrite``, or ``--merge`` where the benchmark has it)."""
    if getattr(args, "worker", False):
        return
    check_output_file(parser, args.json, "--json", overwrite=args.overwrite or getattr(args, "merge", False))


def add_model_arguments(parser: argparse.ArgumentParser, *, segment_length: int = 256,
                        representation_length: Optional[int] = 128,
                        threads_help: str = "torch.set_num_threads (default 1)") -> None:
    """The flags every model benchmark takes: ``--backbone``, HMT's sizes ``-L/-j/-k/-N``, ``--device``,
    ``--dtype``, ``--threads``. ``representation_length=None``: ``-j`` defaults to ``L // 2`` (HMTConfig's)."""
    parser.add_argument("--backbone", default=None, help="backbone name or path (default: SmolLM2-135M)")
    parser.add_argument("--segment-length", "-L", type=positive_int, default=segment_length)
    parser.add_argument("--representation-length", "-j", type=positive_int, default=representation_length,
                        help="default L // 2" if representation_length is None else None)
    parser.add_argument("--sensory", "-k", type=non_negative_int, default=32)
    parser.add_argument("--num-memory", "-N", type=positive_int, default=300)
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=non_negative_int, default=1, help=threads_help)


def model_argv(args: argparse.Namespace) -> list[str]:
    """The flags of :func:`add_model_arguments` as ``args`` holds them, for a worker's command line."""
    argv = ["--device", args.device, "--dtype", args.dtype, "-L", str(args.segment_length), "-k", str(args.sensory),
            "-N", str(args.num_memory), "--threads", str(args.threads)]
    if args.representation_length is not None:
        argv += ["-j", str(args.representation_length)]
    if args.backbone:
        argv += ["--backbone", args.backbone]
    return argv


# --------------------------------------------------------------------------- worker processes
RESULT = "RESULT "  # a worker's last line: RESULT <json figures>


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags a benchmark's own worker process takes: ``--worker`` and ``--ids-file``."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)


def print_result(figures: dict) -> None:
    """A worker's answer to :func:`run_workers`: one line on stdout."""
    print(RESULT + json.dumps(figures), flush=True)


def worker_env(**variables: Any) -> dict[str, str]:
    """This process's environment plus ``variables`` (those set to None are left out)."""
    env = dict(os.environ)
    env.update({name: str(value) for name, value in variables.items() if value is not None})
    return env


def run_workers(runs: Sequence[Hashable], command: Callable[[Any, str], list[str]], ids: torch.Tensor, *,
                jobs: int = 1, env: Optional[dict] = None, label: Callable[[Any], str] = str,
                started: Optional[Callable[[Any, int], None]] = None,
                done: Optional[Callable[[Any, dict, float], None]] = None) -> dict:
    """Run one fresh subprocess per item of ``runs``, in that order, ``jobs`` at a time.

    Measuring each run in its own process keeps its peak memory its own. ``ids`` (token ids)
    are saved once to a temporary file that ``command(run, ids_file)`` (the worker's argv)
    names; the worker prints its figures with :func:`print_result`. Returns ``{run: figures}``;
    a run that fails (non-zero exit or no result line) gets ``{"error": the tail of its
    output, "returncode": ...}`` and a FAILED line. ``started(run, pid)`` and
    ``done(run, figures, seconds)`` report progress.
    """
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = os.path.join(tmp, "ids.pt")
        torch.save(ids, ids_file)
        pending, running = list(runs), []
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                number = len(runs) - len(pending)  # 1, 2, ...: names its log files
                logs = [open(os.path.join(tmp, f"{number}.{name}"), "w+") for name in ("out", "err")]
                proc = subprocess.Popen(command(run, ids_file), stdout=logs[0], stderr=logs[1], text=True,
                                        env=env if env is not None else dict(os.environ))
                running.append((run, proc, logs, time.perf_counter()))
                if started:
                    started(run, proc.pid)
            time.sleep(0.2)
            for item in list(running):
                run, proc, logs, start = item
                if proc.poll() is None:
                    continue
                out, err = [(f.seek(0), f.read(), f.close())[1] for f in logs]
                lines = [line for line in out.splitlines() if line.startswith(RESULT)]
                if proc.returncode != 0 or not lines:
                    tail = (err or out)[-2000:]
                    print(f"  {label(run)}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
                    results[run] = {"error": tail, "returncode": proc.returncode}
                else:
                    results[run] = json.loads(lines[-1][len(RESULT):])
                    if done:
                        done(run, results[run], time.perf_counter() - start)
                running.remove(item)
    return results
