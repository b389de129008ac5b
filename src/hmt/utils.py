"""Small helpers."""

from __future__ import annotations

import hashlib
import sys
from typing import Union

import torch


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
