"""Command-line arguments shared by the ``hmt`` command, the examples and the benchmarks.

A mistake in what a command was asked is one line on stderr and exit status 2, found before
any model loads or any training starts: :class:`Parser` for argparse's own errors, typed
numbers (:func:`int_at_least`, :func:`float_at_least`), output paths checked up front
(:func:`check_output_file`, :func:`check_output_dir`) and :func:`run` for a script's
``main`` (the library's ``ValueError``/``OSError`` on a user's input as one line too).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``PROG: argument --x: ... (see PROG --help)``, status 2;
    ``--debug`` shows the traceback of an error instead (see :func:`run`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="Show the full traceback of an error.")

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def int_at_least(low: int, expected: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``expected`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def float_at_least(low: float, strictly: bool = False, high: Optional[float] = None) -> Callable[[str], float]:
    """An argparse type: a finite number >= ``low`` (> with ``strictly``), at most ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (strictly and value == low):
            raise argparse.ArgumentTypeError(f"must be {'above' if strictly else 'at least'} {low:g}, got {value:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {value:g}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")
positive_float = float_at_least(0.0, strictly=True)
non_negative_float = float_at_least(0.0)


def _writable_folder(folder: Path) -> Optional[str]:
    """Why files cannot be created in ``folder`` (the nearest existing ancestor is probed), or None."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:  # permission bits do not tell everything (root, read-only mounts): create a file there
        handle, name = tempfile.mkstemp(prefix=".hmt-probe-", dir=probe)
        os.close(handle)
        os.remove(name)
    except OSError as err:
        return f"cannot write in {probe} ({err.strerror or err})"
    return None


def check_output_file(parser: argparse.ArgumentParser, path, flag: str, overwrite: bool = False,
                      overwrite_flag: str = "--overwrite") -> None:
    """Refuse, through ``parser.error`` (one line, status 2), an output file ``path`` given as
    ``flag`` that is a folder, cannot be written, or exists (unless ``overwrite``)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        parser.error(f"argument {flag}: {path} is a folder; give a file name")
    if target.exists() and not overwrite:
        parser.error(f"argument {flag}: {path} exists; pass {overwrite_flag} to replace it, or choose another file")
    problem = _writable_folder(target.parent if str(target.parent) else Path("."))
    if problem:
        parser.error(f"argument {flag}: {path}: {problem}")


def check_output_dir(parser: argparse.ArgumentParser, path, flag: str) -> None:
    """Refuse, through ``parser.error``, an output folder ``path`` that is a file or cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        parser.error(f"argument {flag}: {path} is a file, not a folder")
    problem = _writable_folder(target)
    if problem:
        parser.error(f"argument {flag}: {path}: {problem}")


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
        prog: Optional[str] = None) -> int:
    """Run a script's ``main(argv)``: a ``ValueError``, ``OSError`` or ``ImportError`` (what the
    library raises for a bad input, a missing file, a missing package) is one line on stderr and
    status 2, Ctrl-C one line and 130; ``--debug`` shows the traceback. Returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    prog = prog or Path(sys.argv[0]).name
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as err:
        if "--debug" in args:
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
            text += f": {err.filename}"
        print(f"{prog}: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0  # a main that returns its results: success


def device_name(text: str) -> str:
    """An argparse type: ``auto`` or a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name; use auto, cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU usable by torch; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use cpu")
    return text
