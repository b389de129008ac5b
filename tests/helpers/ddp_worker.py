"""Run by the DDP test: `accelerate launch --cpu --num_processes 2 -m tests.helpers.ddp_worker OUT BATCH`."""

import os
import sys

import torch

from hmt.train import train

from .tiny_training import PatternWindows, eval_documents, tiny_backbone, tiny_config

if __name__ == "__main__":
    out, batch_size = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    config = tiny_config(out, batch_size=batch_size, steps=4)
    result = train(config, backbone=tiny_backbone(), train_data=PatternWindows(), eval_data=eval_documents())
    if int(os.environ.get("RANK", "0")) == 0:  # one line: two processes printing at once can interleave
        print("LOSSES", [round(r["loss"], 6) for r in result.history], flush=True)
