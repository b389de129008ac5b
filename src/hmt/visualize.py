"""What the memory holds, as arrays and pictures (matplotlib, headless PNG)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from .model import HMTOutput


def retrieval_matrix(output: HMTOutput, row: int = 0) -> np.ndarray:
    """``(S, S)`` array: entry ``[s, t]`` is how much segment s recalled the memory of segment t.

    Segment indices count from the start of the stream (``cache_segments``); the rows are
    the segments of this call, the columns every segment whose memory could be recalled.
    """
    if output.retrieval_weights is None:
        raise ValueError("This output has no retrieval weights (use_memory=False?).")
    pairs = [(w[row].detach().float().cpu(), s[row].cpu()) for w, s in zip(output.retrieval_weights, output.retrieved_segments)]
    width = 1 + max([int(s.max()) for _, s in pairs if s.numel()] + [len(pairs) - 1])
    matrix = np.full((len(pairs), width), np.nan)
    for i, (weights, retrieved_segments) in enumerate(pairs):
        real = retrieved_segments >= 0
        matrix[i, retrieved_segments[real].numpy()] = weights[real].numpy()
    return matrix


def memory_similarity(output: HMTOutput, row: int = 0) -> np.ndarray:
    """``(S, S)`` cosine similarity between the memory embeddings the segments wrote."""
    memories = output.memory_embeddings[row].detach().float()
    normed = torch.nn.functional.normalize(memories, dim=-1)
    return (normed @ normed.T).cpu().numpy()


def save_figure(path: str | os.PathLike, draw, size=(8, 6), *, xlabel: Optional[str] = None,
                ylabel: Optional[str] = None, title: Optional[str] = None, grid: bool = False, legend: bool = False) -> str:
    """A PNG at ``path`` (headless) of one plot: ``draw(fig, ax)`` draws it, then the labels and
    ``title`` given are set, a light grid and the legend added when asked. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(fig, ax)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_retrieval_heatmap(output: HMTOutput, path: str | os.PathLike, row: int = 0, title: Optional[str] = None) -> str:
    """Heat map of :func:`retrieval_matrix`: which earlier segments each segment recalls."""
    matrix = retrieval_matrix(output, row)

    def draw(fig, ax):
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", origin="upper")
        fig.colorbar(image, ax=ax, label="retrieval weight")

    return save_figure(path, draw, xlabel="memory written by segment", ylabel="segment reading",
                       title=title or "Memory search: which earlier segments each segment recalls")


def plot_memory_similarity(output: HMTOutput, path: str | os.PathLike, row: int = 0) -> str:
    """Heat map of :func:`memory_similarity`."""
    matrix = memory_similarity(output, row)

    def draw(fig, ax):
        image = ax.imshow(matrix, cmap="magma", vmin=min(0.0, float(matrix.min())), vmax=1.0)
        fig.colorbar(image, ax=ax, label="cosine similarity")

    return save_figure(path, draw, (7, 6), xlabel="segment", ylabel="segment",
                       title="Similarity between memory embeddings")


def plot_cache_growth(cache_sizes: Sequence[int], capacity: int, path: str | os.PathLike) -> str:
    """Cache size after each segment against the FIFO capacity N."""

    def draw(fig, ax):
        ax.plot(range(1, len(cache_sizes) + 1), cache_sizes, marker="o", label="memories in the cache")
        ax.axhline(capacity, color="r", linestyle="--", label=f"N = {capacity} (older memories evicted)")

    return save_figure(path, draw, (8, 4.5), xlabel="segment", ylabel="cache size",
                       title="Long-term memory: growth and FIFO eviction", grid=True, legend=True)
