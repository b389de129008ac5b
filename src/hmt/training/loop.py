"""The training loop: one stage, BPTT over unrolled segments, gradient accumulation, logging,
evaluation and checkpoints; each process draws its share of the same global batch."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .. import backbone as bb
from .. import checkpoint
from .. import data as hdata
from .build import build_data, build_model, build_teacher, evidence_report, trained_kind, without_effect
from .config import TrainConfig
from .distributed import accelerator_for, full_state_dict, full_tensor, is_fsdp, pad_to_longest_across
from .evaluation import evaluate_documents
from .lowp import frozen_weights_cast
from .optim import lr_lambda, make_optimizer, optimizer_step
from .objective import training_loss
from .state import STATE_NAME, load_training_state, remove_training_state, save_training_state, start_metrics


@dataclass
class TrainResult:
    steps: int
    final_dir: Optional[str]
    history: list = field(default_factory=list)
    eval: Optional[dict] = None
    interrupted: bool = False


def train(
    config: TrainConfig,
    *,
    backbone: Optional[nn.Module] = None,
    tokenizer=None,
    train_data=None,
    eval_data: Optional[Sequence] = None,
    resume: bool = True,
    stop_after: Optional[int] = None,
) -> TrainResult:
    """Train one stage.

    Args:
        config: the run.
        backbone, tokenizer: use these instead of loading ``config.backbone``.
        train_data: a dataset of ``{"input_ids", "labels"[, "attention_mask"]}`` items
            instead of ``config.data`` (eval_data: token arrays of validation documents).
        resume: continue from ``output_dir/checkpoint`` when it exists.
        stop_after: stop (with a checkpoint) after this many steps of this call, as if
            interrupted: for tests of exact resume.
    """
    from accelerate.utils import set_seed

    own_data = train_data is None  # data built from config.data (else task, mix_data and their options are unused)
    notes = without_effect(config) if own_data else []
    accelerator = accelerator_for(config, notes)
    fsdp = is_fsdp(accelerator)
    for note in notes:
        _warn(accelerator, note)
    set_seed(config.seed)
    out_dir = Path(config.output_dir)
    if backbone is None:
        backbone, loaded_tokenizer = bb.load_backbone(config.backbone)
        tokenizer = tokenizer or loaded_tokenizer
    if train_data is None:
        with accelerator.main_process_first():
            train_data, eval_data = build_data(config, tokenizer)
    teacher = build_teacher(config, backbone, accelerator.device)  # before build_model puts the trained LoRA into backbone
    model = build_model(config, backbone).to(accelerator.device)
    model.train()
    supervise_retrieval = (config.retrieval_loss_weight > 0 and model.config.use_retrieval
                           and not (own_data and config.task == "documents"))
    if config.retrieval_loss_weight > 0 and not model.config.use_retrieval:
        _warn(accelerator, f"retrieval_loss_weight: {config.retrieval_loss_weight} has no effect: this stage runs with "
                           "retrieval off (hmt.use_retrieval: false), so there is no memory search to supervise")
    supervise_write = config.write_loss_weight > 0 and config.use_memory is True and not (own_data and config.task == "documents")
    if supervise_retrieval or supervise_write:
        for note in evidence_report(train_data, model.config, "retrieval_loss_weight" if supervise_retrieval else "write_loss_weight"):
            _warn(accelerator, note)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(model, lr_lambda(config), config.lr, config.hmt_lr, config.weight_decay)
    start_step = 0
    checkpoint_dir = out_dir / "checkpoint"
    if fsdp:  # accelerate shards on HMT's own module boundaries unless told the backbone's layers
        model._no_split_modules = list(getattr(bb.unwrap(backbone), "_no_split_modules", None) or [])
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # under FSDP the model now holds sharded parameters (DTensors) in place of the ones above
    params = [p for p in model.parameters() if p.requires_grad]
    wrote_checkpoint = False  # the training state in checkpoint_dir is this run's: removed once final is written
    if resume and (checkpoint_dir / STATE_NAME).is_file():
        start_step = load_training_state(checkpoint_dir, model, optimizer, scheduler, config)
        wrote_checkpoint = True
        if start_step > config.steps:
            raise ValueError(
                f"{checkpoint_dir} holds this run at step {start_step}, past steps: {config.steps}. Raise steps to "
                f"continue it, or start over (--no-resume, or resume=False) to train {config.steps} steps."
            )
        accelerator.print(f"[hmt] resumed from {checkpoint_dir} at step {start_step}")

    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.batch_size * config.grad_accum * world
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    history, eval_result, interrupted = [], None, False
    metrics_path = out_dir / "metrics.jsonl"
    writer = _tensorboard(out_dir, config) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=list))
        note = start_metrics(metrics_path, start_step)
        if note:
            accelerator.print(f"[hmt] {note}")
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and accelerator.is_main_process), desc="train")
    step = start_step
    # tokens read (every real position of the inputs) and tokens scored (those with a label)
    tokens_seen, started = torch.zeros(2, dtype=torch.long, device=accelerator.device), time.perf_counter()
    pending = []  # steps whose figures are still on the device: read back together at the next log
    cuda = accelerator.device.type == "cuda"
    previous_term = _stop_on_sigterm()
    # bf16 on a CPU: the frozen weights cast once for the run, not by autocast on every call (the same
    # numbers). Not on a GPU, where the cast is cheap and the copy (2 bytes a frozen weight) is not.
    on_cpu = accelerator.device.type == "cpu" and not fsdp
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision) if on_cpu else None
    casts = contextlib.ExitStack()
    if low is not None:
        casts.enter_context(frozen_weights_cast([m for m in (model, teacher) if m is not None], low))
    try:
        while step < config.steps:
            if stop_after is not None and step - start_step >= stop_after:
                interrupted = True
                break
            order = batch_order(len(train_data), step, global_batch, config.seed)
            if world > 1:  # each process reads the whole global batch once, to take an even share of its tokens
                read = {i: train_data[i] for i in order}
                mine = process_share(order, [read[i]["input_ids"].shape[-1] for i in order], world, rank)
            else:
                read, mine = None, order
            losses, aux_losses = [], {}
            for micro in range(config.grad_accum):
                share = mine[micro * config.batch_size : (micro + 1) * config.batch_size]
                items = [read[i] for i in share] if read is not None else [train_data[i] for i in share]
                batch = hdata.pad_collate(items, pad_id)
                if fsdp and world > 1:  # every process must run the same segments (each layer gathers its shards)
                    batch = pad_to_longest_across(batch, accelerator, pad_id)
                if cuda:  # page-locked, so the copy does not make the host wait for the GPU
                    batch = {k: v.pin_memory().to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                else:
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                loss, out, terms = training_loss(
                    model, batch, use_memory=config.use_memory, bptt_depth=config.bptt_depth,
                    gradient_checkpointing=config.gradient_checkpointing, sparse_bptt=config.sparse_bptt, sparse_negatives=config.sparse_negatives,
                    retrieval_loss_weight=config.retrieval_loss_weight if supervise_retrieval else 0.0,
                    write_loss_weight=config.write_loss_weight if supervise_write else 0.0,
                    teacher=teacher, distill_weight=config.distill_weight, forward=wrapped, autocast=accelerator.autocast)
                for name, value in terms.items():
                    aux_losses.setdefault(name, []).append(value.detach())
                loss = loss / config.grad_accum
                if config.grad_accum > 1 and micro < config.grad_accum - 1:
                    with accelerator.no_sync(wrapped):
                        accelerator.backward(loss)
                else:
                    accelerator.backward(loss)
                losses.append(out.loss.detach())
                tokens_seen += torch.stack([batch["attention_mask"].sum(), out.num_tokens.sum()]) * world
            grad_norm = optimizer_step(optimizer, scheduler, params, config.max_grad_norm,
                                       lambda p, norm: full_tensor(accelerator.clip_grad_norm_(p, norm)))  # FSDP: a DTensor
            step += 1
            # Loss, norm and token count stay on the device until a step that logs: reading
            # them back every step would make the host wait for the GPU each time.
            extra = {name: accelerator.reduce(torch.stack(values).mean(), "mean") for name, values in aux_losses.items()}
            pending.append((step, accelerator.reduce(torch.stack(losses).mean(), "mean"), grad_norm,
                            scheduler.get_last_lr()[0], extra))
            evaluating = bool(eval_data) and (step % config.eval_every == 0 or step == config.steps)
            logging = step % config.log_every == 0 or evaluating or step == config.steps
            bar.update(1)
            if not logging and step % config.save_every != 0:
                continue
            record = _read_back(pending, history, tokens_seen, started)
            if evaluating:
                eval_result = evaluate_documents(model, eval_data, config.use_memory, accelerator, lockstep=fsdp)
                record.update({"val_loss": eval_result["loss"], "val_ppl": eval_result["ppl"]})
                record.update({f"val_{k}": v for k, v in eval_result.items() if k in ("answers_ppl", "documents_ppl")})
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **{k: f"{record[k]:.3f}" for k in ("retrieval_loss", "write_loss", "distill_loss") if k in record},
                            **({"val_ppl": f"{record['val_ppl']:.2f}"} if "val_ppl" in record else {}))
            if accelerator.is_main_process and logging:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            writer.add_scalar(key, value, step)
            if step % config.save_every == 0 and step < config.steps:
                save_training_state(checkpoint_dir, model, optimizer, scheduler, step, config, accelerator)
                wrote_checkpoint = True
    except KeyboardInterrupt:
        interrupted = True
        accelerator.print(f"\n[hmt] interrupted at step {step}: saving a checkpoint to resume from")
    finally:
        casts.close()
        _read_back(pending, history, tokens_seen, started)
        bar.close()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if interrupted:
        save_training_state(checkpoint_dir, model, optimizer, scheduler, step, config, accelerator)
        return TrainResult(steps=step, final_dir=None, history=history, eval=eval_result, interrupted=True)
    final_dir = out_dir / "final"
    full_state = full_state_dict(model) if fsdp else None  # every process takes part in gathering it
    if accelerator.is_main_process:
        checkpoint.save(model, final_dir, trained_backbone=trained_kind(config), state_dict=full_state)
        if wrote_checkpoint:
            remove_training_state(checkpoint_dir)
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    return TrainResult(steps=step, final_dir=str(final_dir), history=history, eval=eval_result)


def batch_order(num_items: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Item indices of the global batch at ``step``: epochs of seeded permutations, deterministic."""
    out = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(global_batch - len(out), num_items - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def process_share(order: list[int], lengths: list[int], world: int, rank: int) -> list[int]:
    """The items of the global batch ``order`` (``lengths`` tokens each) that process ``rank`` of
    ``world`` reads, in the order of its micro-batches. Every process gets as many items, and as
    even a share of the tokens as a greedy split gives (longest first, each to the process with the
    fewest tokens so far), so that no process waits long for a slower one at the gradient
    all-reduce; each share runs longest first, so a micro-batch holds items of like lengths. Every
    item of the global batch is read once whichever way it is split (with one item per micro-batch,
    the step's gradient is the same; larger micro-batches weigh their rows by tokens)."""
    per = len(order) // world
    loads, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(order)), key=lambda i: -lengths[i]):
        p = min((p for p in range(world) if len(shares[p]) < per), key=lambda p: loads[p])
        shares[p].append(order[i])
        loads[p] += lengths[i]
    return shares[rank]


def _read_back(pending: list, history: list, tokens_seen: torch.Tensor, started: float) -> Optional[dict]:
    """Move the steps in ``pending`` (step, loss, grad norm, lr, a dict of further figures such as
    ``retrieval_loss``; tensors on the device) into ``history`` as numbers, with one read from the device; the last record also gets the
    throughput so far. Returns that record (None when nothing was pending)."""
    if not pending:
        return None
    values = torch.stack([torch.stack([loss.float(), torch.as_tensor(norm, device=loss.device).float(),
                                       *(v.float() for v in extra.values())])
                          for _, loss, norm, _, extra in pending]).tolist()
    elapsed, (read, scored) = time.perf_counter() - started, tokens_seen.tolist()
    for (done, _, _, lr, extra), (loss, norm, *more) in zip(pending, values):
        history.append({"step": done, "loss": loss, "lr": lr, "grad_norm": norm, **dict(zip(extra, more))})
    pending.clear()
    # tokens_per_s: every token the model read (the work done); scored_tokens_per_s: those with a loss
    history[-1].update(tokens_per_s=read / elapsed, scored_tokens_per_s=scored / elapsed, elapsed_s=elapsed)
    return history[-1]


def _warn(accelerator, message: str) -> None:
    """A setting that does not do what it seems to, said once (by the main process)."""
    if accelerator.is_main_process:
        print(f"[hmt] warning: {message}", file=sys.stderr, flush=True)


def _stop_on_sigterm():
    """Treat SIGTERM (a scheduler preempting the job, `kill`) like Ctrl-C: save, then stop."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _tensorboard(out_dir: Path, config: TrainConfig):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("tensorboard: true needs the tensorboard package: pip install tensorboard") from err
    return SummaryWriter(str(out_dir / "tensorboard"))
