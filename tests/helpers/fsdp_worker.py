"""Run by the FSDP test: `accelerate launch --config_file recipes/accelerate/fsdp.yaml -m tests.helpers.fsdp_worker OUT BATCH`.

Trains like the DDP worker, but in two calls: the first stops after 2 steps (writing the
resume checkpoint from the shards), the second resumes from it and finishes. Process 0 prints
the distributed type, how many parameter elements it holds against the whole model's (sharded:
about 1/N) and how many FSDP units the model has, then the losses of both calls together."""

import os
import sys

import accelerate
import torch

from hmt.train import train

from .tiny_training import PatternWindows, eval_documents, tiny_backbone, tiny_config

if __name__ == "__main__":
    out, batch_size = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    seen = {}
    prepare = accelerate.Accelerator.prepare

    def recording_prepare(self, *args, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        result = prepare(self, *args, **kwargs)
        model = next(obj for obj in result if isinstance(obj, torch.nn.Module))
        params = list(model.parameters())
        seen["local"] = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
        seen["global"] = sum(p.numel() for p in params)
        seen["units"] = sum(isinstance(m, FSDPModule) for m in model.modules())
        seen["type"] = str(self.distributed_type)
        return result

    accelerate.Accelerator.prepare = recording_prepare
    config = tiny_config(out, batch_size=batch_size, steps=4)
    first = train(config, backbone=tiny_backbone(), train_data=PatternWindows(), eval_data=eval_documents(), stop_after=2)
    rest = train(config, backbone=tiny_backbone(), train_data=PatternWindows(), eval_data=eval_documents())
    if int(os.environ.get("RANK", "0")) == 0:  # one line each: two processes printing at once can interleave
        print("PARAMS", seen["type"], seen["local"], seen["global"], seen["units"], flush=True)
        print("LOSSES", [round(r["loss"], 6) for r in first.history + rest.history], flush=True)
