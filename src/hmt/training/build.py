"""What a run trains on and what trains: the model (backbone, LoRA, start checkpoint, trainable
parameters) and the data (training windows or task examples, validation documents), with the
warnings a run gives about settings that do nothing."""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from torch import nn

from .. import backbone as bb
from .. import data as hdata
from ..baselines import memory_mode
from ..checkpoint import read_meta
from ..config import HMTConfig
from ..model import HMT
from ..utils import spread
from .config import TrainConfig


def build_model(config: TrainConfig, backbone: Optional[nn.Module] = None) -> HMT:
    """The HMT to train: backbone (+ LoRA), HMT config, start checkpoint, trainable parameters."""
    if backbone is None:
        backbone, _ = bb.load_backbone(config.backbone)
    hmt_overrides = dict(config.hmt)
    if config.init_from:
        read_meta(config.init_from)  # a clear error before anything loads
        # Fields that add or reshape HMT's own modules: the checkpoint loads as it was saved,
        # then the new modules start fresh (e.g. a compression layer added in a later stage).
        structural = {k: hmt_overrides.pop(k) for k in ("memory_compression", "retrieval_dim", "memory_tokens", "memory_write")
                      if k in hmt_overrides}
        model = HMT.from_pretrained(backbone, config.init_from, **hmt_overrides)
        backbone = model.backbone
        if any(getattr(model.config, k) != v for k, v in structural.items()):
            model = model.with_backbone(backbone, dataclasses.replace(model.config, **structural))
    else:
        model = None
    if config.trainable == "lora" and bb.unwrap(backbone) is backbone:
        from peft import LoraConfig, get_peft_model

        target = config.lora_target_modules
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=target if isinstance(target, str) else list(target))
        backbone = get_peft_model(backbone, lora)
        model = None if model is None else model.with_backbone(backbone)
    if model is None:
        model = HMT(backbone, config.hmt_config())
    set_trainable(model, config)
    return model


def build_teacher(config: TrainConfig, backbone: nn.Module, device=None) -> Optional[HMT]:
    """The frozen HMT that ``distill_weight`` keeps the model close to: ``config.distill_from`` on a
    copy of ``backbone`` (taken before the trained model's LoRA goes into it), on ``device``, in eval
    mode, no parameter requiring grad; None when the run does not distil."""
    if config.distill_weight <= 0:
        return None
    read_meta(config.distill_from)  # a clear error before anything loads
    teacher = HMT.from_pretrained(copy.deepcopy(backbone), config.distill_from).to(device)
    teacher.requires_grad_(False)
    return teacher.eval()


def set_trainable(model: HMT, config: TrainConfig) -> list[str]:
    """Freeze everything, then unfreeze what this run trains; returns the trained names."""
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if not HMT.is_own(name):
            if config.trainable == "full" or (config.trainable == "lora" and "lora_" in name):
                param.requires_grad_(True)
        elif memory_mode(config.use_memory)[0]:
            retrieval_only = name.startswith("representation_encoder.") or name.startswith("memory_search.query") or name.startswith("memory_search.key")
            # Stage 1 (no retrieval) never uses T, W_q, W_k: leave them frozen (DDP needs every trained parameter used).
            param.requires_grad_(model.config.use_retrieval or not retrieval_only)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError(f"Nothing to train: use_memory={config.use_memory!r} with trainable='memory' leaves no parameter trainable.")
    return trained


def build_data(config: TrainConfig, tokenizer):
    """Training windows and validation documents from ``config.data``."""
    if config.task == "qa":
        examples = hdata.load_qa_examples(config.data, **config.data_options)
        split = {name: [e for e in examples if hdata.assign_split(e.name, config.split_fractions, config.split_seed) == name]
                 for name in ("train", "validation")}
        if not split["train"]:
            raise ValueError(f"{config.data}: no training example (check split_fractions).")
        train = hdata.QADataset(split["train"], tokenizer, progress=config.progress, **config.qa_options)
        val = hdata.QADataset(split["validation"][: config.eval_documents], tokenizer, progress=False, **config.qa_options)
        val = [val[i] for i in range(len(val))]
        if config.mix_fraction > 0:  # language-model windows beside the task, scored apart in validation
            windows, documents = _document_data(config, tokenizer, config.mix_data, config.mix_data_options)
            train, val = hdata.MixedDataset(train, windows, config.mix_fraction, seed=config.seed), val + documents
        return train, val
    return _document_data(config, tokenizer, config.data, config.data_options)


def _document_data(config: TrainConfig, tokenizer, source, options: dict):
    """Training windows and validation documents (token arrays) of a document source."""
    config = dataclasses.replace(config, data=source, data_options=options)
    corpus = hdata.TokenizedCorpus.from_source(config.data, tokenizer, progress=config.progress, **config.data_options)
    found = f"{corpus.num_documents} document(s), {corpus.num_tokens} tokens"
    train_part = hdata.split_documents(corpus, "train", config.split_fractions, seed=config.split_seed)
    val_part = hdata.split_documents(corpus, "validation", config.split_fractions, seed=config.split_seed)
    if train_part.within_documents:
        print(f"[hmt] {config.data}: {found}, too few documents for a document-level split: splitting inside each "
              f"document by token ranges (train, validation, test = {list(config.split_fractions)} of its tokens)")
    train = hdata.WindowDataset(train_part, None, window=config.window, stride=config.window_stride)
    if len(train) == 0:
        longest = int(train_part.lengths.max()) if train_part.num_documents else 0
        raise ValueError(
            f"{config.data}: no training document holds a full window of {config.window} tokens "
            f"(segments_per_window x hmt.segment_length; found {found}, the training part's longest "
            f"{longest} tokens). Lower segments_per_window or hmt.segment_length, or add data."
        )
    val_docs = [i for i in range(val_part.num_documents) if val_part.lengths[i] >= max(1, config.eval_min_tokens)]
    if not val_docs:
        longest = int(val_part.lengths.max()) if val_part.num_documents else 0
        raise ValueError(
            f"{config.data}: no validation document has {max(1, config.eval_min_tokens)} tokens (found {found}; "
            f"{val_part.num_documents} in the validation part, the longest {longest} tokens). Lower eval_min_tokens, "
            "raise the validation share of split_fractions, or add data."
        )
    # Spread the scored documents over the split (a mixture lists its sources in order).
    val = [val_part.document(i)[: config.eval_max_tokens] for i in spread(val_docs, config.eval_documents)]
    return train, val


def without_effect(config: TrainConfig) -> list[str]:
    """Fields this run sets that do nothing, or not what they may seem to, each as a sentence saying so."""
    notes = []
    if config.mix_data is not None and config.mix_fraction == 0:
        notes.append("mix_data has no effect with mix_fraction: 0 (no language-model window is mixed in); "
                     "set mix_fraction, e.g. 0.25")
    if config.mix_data is None and config.mix_data_options:
        notes.append("mix_data_options has no effect without mix_data")
    if config.task == "documents" and config.qa_options:
        notes.append("qa_options has no effect with task: documents (they are for task: qa)")
    if (config.task == "documents" or config.mix_fraction > 0) and config.split_fractions[2] == 0:
        notes.append(f"split_fractions {list(config.split_fractions)} leaves no test documents, so documents that an "
                     "evaluation holds out (examples/main.py scores the test split of [0.8, 0.1, 0.1]) may be trained "
                     "on; keep a test share, e.g. split_fractions: [0.8, 0.1, 0.1]")
    if config.distill_from and config.distill_weight == 0:
        notes.append("distill_from has no effect with distill_weight: 0; set distill_weight, e.g. 1.0")
    for name in ("retrieval_loss_weight", "write_loss_weight"):
        if config.task == "documents" and getattr(config, name) > 0:
            notes.append(f"{name}: {getattr(config, name)} has no effect with task: documents "
                         "(language-model windows name no evidence); it supervises task: qa examples with an evidence field")
    return notes


def evidence_report(train_data, hmt_config: HMTConfig, weight: str = "retrieval_loss_weight") -> list[str]:
    """Check that the supervised retrieval loss (or the write loss: ``weight`` names the setting
    that asks for it) has task examples to act on.

    An example's evidence is placed when its passage is found in the (truncated) context
    (:class:`hmt.data.QADataset`) and the memory of the evidence's segment ``e`` is in the cache
    when the answer's segment ``q`` searches it: ``e < q`` (memories are written at the end of a
    segment) and ``q - e <= num_memory_embeddings`` (the cache keeps the last N). The loss skips
    every other example. Returns a warning that counts them (with an example of each reason);
    raises a ``ValueError`` when no example can be placed. Datasets other than a ``QADataset``
    (or a ``MixedDataset`` of one) are not checked.
    """
    tasks = train_data.primary if isinstance(train_data, hdata.MixedDataset) else train_data
    if not isinstance(tasks, hdata.QADataset):
        return []
    L, N = hmt_config.segment_length, hmt_config.num_memory_embeddings
    problems: dict = {}  # reason -> names of the examples
    for example, position, problem, answer in zip(tasks.examples, tasks.evidence_positions, tasks.evidence_problems,
                                                  tasks.answer_starts):
        if position >= 0 and weight == "retrieval_loss_weight":  # the write loss needs no search, only the memory
            evidence, query = position // L, max(answer - 1, 0) // L
            if evidence >= query:
                problem = "in the answer's own segment (its memory is written after the search)"
            elif query - evidence > N:
                problem = f"evicted from the cache (more than num_memory_embeddings={N} segments before the answer)"
        if problem:
            problems.setdefault(problem, []).append(example.name or "?")
    if not problems:
        return []
    missing = sum(len(names) for names in problems.values())
    detail = "; ".join(f"{len(names)} {reason} (e.g. {names[0]})"
                       for reason, names in sorted(problems.items(), key=lambda item: -len(item[1])))
    if missing == len(tasks):
        raise ValueError(
            f"{weight} > 0, but no training example's evidence can be placed ({detail}). Give rows an "
            "'evidence' field holding a passage of their context (data_options.evidence_field names another), or set "
            f"{weight}: 0."
        )
    loss = weight.removesuffix("_weight").replace("_", " ")
    return [f"the {loss} skips {missing} of {len(tasks)} training examples whose evidence cannot be placed: "
            f"{detail}"]


def trained_kind(config: TrainConfig) -> str:
    """What of the backbone the final checkpoint must hold: what this run trained, or, for a
    memory-only run, what its start checkpoint already carried (e.g. a frozen LoRA)."""
    if config.trainable == "memory":
        return read_meta(config.init_from).get("trained_backbone", "none") if config.init_from else "none"
    return config.trainable
