"""Small helpers."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Sequence, TypeVar, Union

import torch

T = TypeVar("T")


def get_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def say(message: str) -> None:
    """Tell the user what hmt is doing (a download, a cache written): ``[hmt] message`` on stderr."""
    print(f"[hmt] {message}", file=sys.stderr, flush=True)


def digest(text: Union[str, bytes], n: int = 24) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``text`` (UTF-8): a short cache key."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:n]


def cache_dir() -> Path:
    """Where hmt caches what it fetches or converts (backbones, corpora, token caches): $HMT_CACHE,
    else $XDG_CACHE_HOME/hmt, else ~/.cache/hmt."""
    if os.environ.get("HMT_CACHE"):
        return Path(os.environ["HMT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hmt"


def chmod_as_created(path: Union[str, os.PathLike], mode: int = 0o666) -> None:
    """Give ``path`` the permissions ``open()`` (``mode`` 0o666) or ``mkdir`` (0o777) would have given
    it under the process umask: for files written 0600 by a library (safetensors) or folders made
    0700 by ``tempfile.mkdtemp``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def spread(items: Sequence[T], count: int) -> list[T]:
    """``count`` of ``items`` (all of them when fewer) spread evenly over the sequence, first included:
    e.g. the documents scored from a split, which may list its sources one after the other."""
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]


def quiet_libraries() -> None:
    """Silence what other libraries print on every load: transformers' weight-loading progress
    bars, its info and deprecation chatter, and FutureWarnings (commands and examples call this;
    hmt's own progress bars and messages stay)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
