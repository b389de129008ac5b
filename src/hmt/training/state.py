"""Exact resume: the training state a run checkpoints (trained parameters, optimizer, schedule, RNG),
written atomically and checked against the run that reads it, and the metrics log kept in step."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import replace_dir
from ..model import HMT
from .config import TrainConfig
from .distributed import full_tensor, full_tree, shard_like


STATE_NAME = "training_state.pt"


def save_training_state(directory: Path, model: HMT, optimizer, scheduler, step: int, config: TrainConfig, accelerator) -> None:
    """Write everything a resumed run needs, atomically (a crash leaves the previous checkpoint)."""
    accelerator.wait_for_everyone()
    # Under FSDP each process holds shards: every process gathers the full tensors (in the same order).
    trained = {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}
    optimizer_state = full_tree(optimizer.state_dict())
    if accelerator.is_main_process:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # A fresh staging folder of its own: never one a user (or another run) already has.
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-", dir=directory.parent))
        state = {
            "step": step,
            "identity": json.dumps(config.identity(), sort_keys=True),
            "trained": trained,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        try:
            torch.save(state, staging / STATE_NAME)
            replace_dir(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()


def remove_training_state(directory: Path) -> None:
    """Remove the training state this run wrote in ``directory``, and the folder if nothing else is in it
    (files a user keeps there stay)."""
    (directory / STATE_NAME).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not empty (or gone): leave it
        pass


def load_training_state(directory: Path, model: HMT, optimizer, scheduler, config: TrainConfig) -> int:
    path = directory / STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise ValueError(f"Training checkpoint {path} is corrupt ({err}). Delete {directory} to start over.") from err
    if state.get("identity") != json.dumps(config.identity(), sort_keys=True):
        saved = json.loads(state.get("identity", "{}"))
        diff = sorted(k for k in set(saved) | set(config.identity()) if saved.get(k) != config.identity().get(k))
        raise ValueError(
            f"{directory} belongs to a different run (fields {diff} differ). Use another output_dir, "
            "restore those settings, or delete the checkpoint to start over."
        )
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trained"].items():
            if name not in named:
                raise ValueError(f"Training checkpoint {path} has parameter {name!r} that this model lacks.")
            named[name].copy_(shard_like(value, named[name]))
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # FSDP: the saved full moments, sharded like their parameters
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    moments[key] = shard_like(value, param)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def start_metrics(path: Path, start_step: int) -> Optional[str]:
    """Make ``metrics.jsonl`` this run's alone: a new run moves an earlier run's file aside; a resumed run
    drops the records past its checkpoint (it logs those steps again). Returns what it did, if anything."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    if start_step == 0:
        number = 1
        while (aside := path.with_name(f"{path.stem}.earlier-{number}{path.suffix}")).exists():
            number += 1
        os.replace(path, aside)
        return f"{path} held an earlier run: moved to {aside.name}; this run's figures start a new file"
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= start_step
        except (ValueError, KeyError, TypeError):  # a line cut short by the crash that stopped the run
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if not dropped:
        return None
    path.write_text("".join(line + "\n" for line in kept))
    return f"{path}: dropped {dropped} record(s) past step {start_step}, the checkpoint this run resumes from"
