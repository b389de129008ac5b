"""Helpers shared by the benchmarks: real text, devices, synchronisation, tables."""

from __future__ import annotations

import json
import os
import sys
import resource
import platform
import statistics
from typing import Any, Iterable, Optional, Sequence

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(table)}")
    return table[name]


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


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
    if not path:
        return
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
