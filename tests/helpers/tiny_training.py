"""A tiny, deterministic training setup shared by the trainer tests and the DDP worker."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from hmt.train import TrainConfig

from ..conftest import make_backbone

L = 8


class PatternWindows(Dataset):
    """Windows of a learnable sequence: each repeats a random 5-token motif over a small alphabet."""

    def __init__(self, count: int = 16, window: int = 3 * L, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(count):
            motif = torch.randint(3, 11, (5,), generator=generator)  # 8 of the 128 tokens: quick to learn
            ids = motif.repeat(window // 5 + 1)[:window]
            self.items.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def tiny_config(output_dir, **overrides) -> TrainConfig:
    values = dict(
        hmt=dict(segment_length=L, sensory_memory_size=2, num_memory_embeddings=4),
        trainable="lora", lora_r=2, lora_alpha=4, lora_target_modules=["q_proj", "v_proj"],
        segments_per_window=3, steps=6, batch_size=2, lr=3e-3, warmup_steps=2, decay_every=2,
        eval_every=3, save_every=2, log_every=1, output_dir=str(output_dir), progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def eval_documents():
    generator = torch.Generator().manual_seed(99)
    return [torch.randint(3, 11, (4 * L + 3,), generator=generator) for _ in range(2)]


def tiny_backbone():
    return make_backbone("llama", seed=0)
