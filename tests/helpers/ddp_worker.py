"""Run by the DDP tests: `accelerate launch --cpu --num_processes 2 -m tests.helpers.ddp_worker OUT BATCH [ACCUM [uneven]]`."""

import os
import sys

import torch

from hmt.train import train

from .tiny_training import L, PatternWindows, eval_documents, tiny_backbone, tiny_config

if __name__ == "__main__":
    out, batch_size = sys.argv[1], int(sys.argv[2])
    grad_accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    uneven = sys.argv[4:] == ["uneven"]  # rows of 1 and 3 segments: a one-segment row never searches the cache
    torch.set_num_threads(1)
    config = tiny_config(out, batch_size=batch_size, grad_accum=grad_accum, steps=4)
    data = PatternWindows()
    if uneven:
        data.items = [{k: v[: L if i % 2 else 3 * L] for k, v in item.items()} for i, item in enumerate(data.items)]
    result = train(config, backbone=tiny_backbone(), train_data=data, eval_data=eval_documents())
    if int(os.environ.get("RANK", "0")) == 0:  # one line: two processes printing at once can interleave
        print("LOSSES", [round(r["loss"], 6) for r in result.history], flush=True)
