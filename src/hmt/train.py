"""Training HMT: BPTT over unrolled segments, the paper's two-stage recipe, exact resume.

The CLI (``hmt train --config recipe.yaml``) and the Python API (:func:`train`) are the
same code. It runs as one process or under ``accelerate launch`` (DDP, or FSDP2 with
recipes/accelerate/fsdp.yaml, also on CPUs); every process
draws its share of the same global batch, so the result does not depend on how many
processes there are.

A recipe is YAML: either the fields of :class:`TrainConfig` at the top level, or
``common:`` fields plus a list of ``stages:``, each with a ``name`` and its overrides. A
stage's ``init_from`` may name an earlier stage (``"stage:NAME"``) to start from its
final checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import backbone as bb
from . import checkpoint, compat
from . import data as hdata
from .baselines import memory_mode
from .checkpoint import read_meta, replace_dir
from .config import HMTConfig
from .constants import IGNORE_INDEX
from .evaluate import score_document
from .model import HMT
from .utils import spread

TRAINABLE = ("memory", "lora", "full")
STATE_NAME = "training_state.pt"


@dataclass
class TrainConfig:
    """One training run (one stage of a recipe)."""

    # --- model
    backbone: Optional[str] = field(default=None, metadata={"help": "Backbone id or directory; None: SmolLM2-135M."})
    hmt: dict = field(default_factory=dict, metadata={"help": "HMTConfig fields (segment_length, ...)."})
    use_memory: Any = field(
        default=True,
        metadata={"help": "False trains the baseline: the same backbone on the same disjoint segments, no memory; "
                          "'sensory': the baseline with each segment prefixed by the last k tokens before it."},
    )
    init_from: Optional[str] = field(
        default=None, metadata={"help": "HMT checkpoint directory (or 'stage:NAME') to start from."}
    )
    trainable: str = field(
        default="lora", metadata={"help": "What trains besides HMT's own parameters: 'memory' (nothing), 'lora', 'full'."}
    )
    lora_r: int = field(default=8, metadata={"min": 1})
    lora_alpha: int = field(default=32, metadata={"min": 1})
    lora_dropout: float = field(default=0.0, metadata={"min": 0, "below": 1})
    lora_target_modules: Any = field(default="all-linear", metadata={"help": "peft target_modules."})
    # --- data
    data: Any = field(default="kjv", metadata={"help": "Source for hmt.data: path, glob, JSONL, 'hf:NAME', 'kjv', ... or a list."})
    task: str = field(
        default="documents",
        metadata={"help": "'documents' (language modelling on windows of S x L tokens) or 'qa' ((context, "
                          "prompt, answer) examples, loss on the answer only; data_options go to "
                          "hmt.data.load_qa_examples, qa_options to hmt.data.QADataset)."},
    )
    qa_options: dict = field(default_factory=dict, metadata={"help": "Options for hmt.data.QADataset (templates, max_length)."})
    mix_data: Any = field(
        default=None,
        metadata={"help": "With task 'qa': a document source (as 'data') whose language-model windows of S x L tokens "
                          "are mixed into the training items, so that a model taught a task keeps its perplexity."},
    )
    mix_fraction: float = field(default=0.0, metadata={"help": "Share of training items drawn from mix_data (0 to <1).",
                                                       "min": 0, "below": 1})
    mix_data_options: dict = field(default_factory=dict, metadata={"help": "Options for hmt.data.load_documents of mix_data."})
    retrieval_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the supervised retrieval loss (the paper's code uses 0.05): on task examples "
                          "whose evidence is known (an 'evidence' field), cross-entropy of the memory search of the "
                          "segment that predicts the answer against the memory the evidence's segment wrote. "
                          "Applies in stages with retrieval on; logged as retrieval_loss. The run says how many "
                          "examples' evidence cannot be placed and refuses when none can.",
                  "min": 0},
    )
    data_options: dict = field(default_factory=dict, metadata={
        "help": "Options for hmt.data.load_documents (task 'documents') or hmt.data.load_qa_examples (task 'qa')."})
    split_fractions: Sequence[float] = (0.9, 0.05, 0.05)
    split_seed: int = field(default=0, metadata={"min": 0})
    segments_per_window: int = field(default=2, metadata={"help": "S: segments unrolled per training window (BPTT depth).",
                                                          "min": 1})
    window_stride: Optional[int] = field(default=None, metadata={"help": "Tokens between window starts (default: a window).",
                                                                 "min": 1})
    eval_documents: int = field(default=4, metadata={"help": "Validation documents scored at each evaluation.", "min": 0})
    eval_max_tokens: int = field(default=4096, metadata={"help": "Tokens scored per validation document (its start).",
                                                         "min": 1})
    eval_min_tokens: int = field(default=0, metadata={"help": "Score only validation documents at least this long.",
                                                      "min": 0})
    # --- optimisation
    steps: int = field(default=100, metadata={"min": 1})
    batch_size: int = field(default=2, metadata={"help": "Windows per process per micro-step.", "min": 1})
    grad_accum: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=1e-4, metadata={"min": 0})
    hmt_lr: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of HMT's own parameters (T, initial memory, W_q, W_k, compression); None: lr.",
                  "min": 0},
    )
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    warmup_steps: int = field(default=10, metadata={"min": 0})
    decay: str = field(default="step", metadata={"help": "'step' (x decay_gamma every decay_every steps, the paper's), 'cosine', 'constant'."})
    decay_every: int = field(default=100, metadata={"min": 1})
    decay_gamma: float = field(default=0.8, metadata={"above": 0, "max": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradients are clipped to this norm.", "above": 0})
    bptt_depth: Optional[int] = field(default=None, metadata={"help": "Truncate BPTT: detach the memory every K segments.",
                                                              "min": 1})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute each segment in backward."})
    sparse_bptt: bool = field(
        default=False,
        metadata={"help": "Evidence-sparse BPTT for task examples whose evidence is known: only the segments holding "
                          "the evidence or the answer run with autograd; the others run forward only and their "
                          "memories enter the cache detached. Batches with a row of unknown evidence (language-model "
                          "windows) keep full BPTT."},
    )
    precision: str = field(default="auto", metadata={"help": "'fp32', 'bf16', 'fp16' or 'auto' (bf16 on a GPU that has it)."})
    # --- bookkeeping
    output_dir: str = "runs/hmt"
    eval_every: int = field(default=50, metadata={"min": 1})
    save_every: int = field(default=50, metadata={"min": 1})
    log_every: int = field(default=10, metadata={"min": 1})
    seed: int = field(default=0, metadata={"min": 0})
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):  # each value against its declared type and range (see _checked)
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if not isinstance(self.use_memory, bool) and self.use_memory != "sensory":
            raise ValueError(f"TrainConfig.use_memory must be true, false or 'sensory', got {self.use_memory!r}.")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"TrainConfig.trainable must be one of {TRAINABLE}, got {self.trainable!r}.")
        if self.task not in ("documents", "qa"):
            raise ValueError(f"TrainConfig.task must be 'documents' or 'qa', got {self.task!r}.")
        if self.decay not in ("step", "cosine", "constant"):
            raise ValueError(f"TrainConfig.decay must be 'step', 'cosine' or 'constant', got {self.decay!r}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.precision must be auto/fp32/bf16/fp16, got {self.precision!r}.")
        if (not isinstance(self.split_fractions, (list, tuple)) or len(self.split_fractions) != 3
                or not all(_is_number(f) and f >= 0 for f in self.split_fractions)
                or not math.isclose(sum(self.split_fractions), 1.0, abs_tol=1e-6)):
            raise ValueError("TrainConfig.split_fractions must be three numbers >= 0 (train, validation, test) summing "
                             f"to 1, got {self.split_fractions!r}.")
        if self.mix_fraction > 0 and (self.task != "qa" or self.mix_data is None):
            raise ValueError("TrainConfig.mix_fraction > 0 mixes language-model windows of mix_data into a 'qa' task: "
                             "set task: qa and mix_data.")
        if self.retrieval_loss_weight > 0 and self.use_memory is not True:
            raise ValueError("TrainConfig.retrieval_loss_weight supervises HMT's memory search: it needs use_memory: true.")
        for name in ("data_options", "qa_options", "mix_data_options"):
            _check_options(name, getattr(self, name), _accepted_options(name, self.task))
        self.hmt_config()  # validate the HMT fields now, not after loading a model

    def hmt_config(self) -> HMTConfig:
        return HMTConfig.from_dict(dict(self.hmt))

    @property
    def window(self) -> int:
        return self.segments_per_window * self.hmt_config().segment_length

    def identity(self) -> dict:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        keep = ("backbone", "hmt", "use_memory", "init_from", "trainable", "lora_r", "lora_alpha", "lora_target_modules",
                "data", "task", "data_options", "qa_options", "split_fractions", "split_seed", "segments_per_window", "window_stride",
                "batch_size", "grad_accum", "seed")
        return json.loads(json.dumps({k: getattr(self, k) for k in keep}, default=list))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown training fields {unknown}; see `hmt train --help-fields`.")
        return cls(**values)


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _declared(f: dataclasses.Field) -> tuple:
    """``(type, optional)`` of field ``f``: ``Optional[int]`` is ``(int, True)``."""
    hint = _FIELD_TYPES[f.name]
    if typing.get_origin(hint) is Union and type(None) in typing.get_args(hint):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None)), True
    return hint, False


def _checked(f: dataclasses.Field, value):
    """``value`` of field ``f`` as its declared type (``int``, ``float``, ``bool``, ``str``, ``dict``,
    ``Optional[...]`` of those; ``Any`` is checked elsewhere), within the bounds in its metadata
    (``min``/``max`` inclusive, ``above``/``below`` exclusive). Anything else: a ValueError naming the field
    and what it accepts."""
    hint, optional = _declared(f)
    if (optional and value is None) or hint not in (int, float, bool, str, dict):
        return value
    limits = f.metadata
    problem = ValueError(f"TrainConfig.{f.name} must be {_accepts(f)}, got {value!r}.")
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise problem from None
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers are integers
    elif hint is float and _is_number(value):
        value = float(value)
        if not math.isfinite(value):
            raise problem
    elif hint in (bool, str, dict):
        if not isinstance(value, hint):
            raise problem
        return value
    else:
        raise problem
    if (("min" in limits and value < limits["min"]) or ("above" in limits and value <= limits["above"])
            or ("max" in limits and value > limits["max"]) or ("below" in limits and value >= limits["below"])):
        raise problem
    return value


def _accepts(f: dataclasses.Field) -> str:
    """What field ``f`` accepts, in words ("a number > 0 and <= 1"); "" for a field checked elsewhere."""
    hint, optional = _declared(f)
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping of options (YAML key: value)"}.get(hint)
    if kind is None:
        return ""
    limits = f.metadata
    bounds = [f">= {limits['min']}" if "min" in limits else f"> {limits['above']}" if "above" in limits else "",
              f"<= {limits['max']}" if "max" in limits else f"< {limits['below']}" if "below" in limits else ""]
    accepts = " and ".join(b for b in bounds if b)
    accepts = "a positive integer" if hint is int and accepts == ">= 1" else f"{kind} {accepts}".strip()
    return accepts + (" or null" if optional else "")


def _accepted_options(name: str, task: str) -> tuple:
    """The keys ``TrainConfig.<name>`` may hold: the keyword arguments of the function it is passed to."""
    import inspect

    def keywords(function, leave=()) -> tuple:
        return tuple(p.name for p in inspect.signature(function).parameters.values()
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
                     and p.name not in leave)

    documents = keywords(hdata.iter_documents) + keywords(hdata.TokenizedCorpus.from_source, leave=("progress",))
    if name == "qa_options":
        return keywords(hdata.QADataset, leave=("progress",))
    if name == "data_options" and task == "qa":
        return keywords(hdata.load_qa_examples)
    return documents


def _check_options(name: str, options: dict, accepted: Sequence[str]) -> None:
    unknown = sorted(str(key) for key in options if key not in accepted)
    if unknown:
        raise ValueError(f"TrainConfig.{name}: unknown option(s) {', '.join(unknown)}; it accepts "
                         f"{', '.join(accepted)}.")


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> list[tuple[str, TrainConfig]]:
    """Read a YAML recipe into ``[(stage name, TrainConfig), ...]``.

    ``overrides`` are ``key=value`` strings (YAML values) applied to every stage, e.g.
    ``steps=10`` or ``hmt.segment_length=128``.
    """
    import yaml

    if Path(path).is_dir():
        raise ValueError(f"Recipe {path} is a directory; give a YAML file (see recipes/).")
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Recipe {path} does not exist (see recipes/ for examples).") from err
    except yaml.YAMLError as err:
        raise ValueError(f"Recipe {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a YAML mapping.")
    stages = recipe.pop("stages", None)
    common = recipe.pop("common", {}) if stages is not None else recipe
    if stages is None:
        stages = [{"name": "main"}]
    elif recipe:
        raise ValueError(f"Recipe {path}: with 'stages', put shared fields under 'common' (found {sorted(recipe)}).")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"Recipe {path}: 'stages' must be a non-empty list of stages (each a mapping with a name), "
                         f"got {stages!r}; or drop 'stages' and put the fields at the top level.")
    if not isinstance(common, dict):
        raise ValueError(f"Recipe {path}: 'common' must be a mapping of fields, got {common!r}.")
    parsed = []
    for stage in stages:
        if not isinstance(stage, dict):
            raise ValueError(f"Recipe {path}: each stage must be a mapping of fields with a name, got {stage!r}.")
        stage = dict(stage)
        name = str(stage.pop("name", f"stage{len(parsed) + 1}"))
        if name in (other for other, _ in parsed):
            raise ValueError(f"Recipe {path}: two stages are named {name!r}; give each stage its own name.")
        values = _merge(common, stage)
        for item in overrides:
            key, _, raw = item.partition("=")
            if not _:
                raise ValueError(f"Override {item!r} must look like key=value.")
            try:
                parsed_value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                raise ValueError(f"--set {item}: the value is not valid YAML ({' '.join(str(err).split())}).") from err
            _set_dotted(values, key.strip(), parsed_value, item)
        if "output_dir" not in stage:
            values["output_dir"] = str(Path(values.get("output_dir", "runs/hmt")) / name) if len(stages) > 1 else values.get("output_dir", "runs/hmt")
        parsed.append((name, values))
    outputs = {name: values["output_dir"] for name, values in parsed}
    result = []
    for name, values in parsed:
        init = values.get("init_from")
        if isinstance(init, str) and init.startswith("stage:"):
            other = init.split(":", 1)[1]
            if other not in outputs:
                raise ValueError(f"Stage {name!r} starts from unknown stage {other!r}.")
            values["init_from"] = str(Path(outputs[other]) / "final")
        result.append((name, TrainConfig.from_dict(values)))
    return result


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(values: dict, key: str, value: Any, item: str) -> None:
    *parents, last = key.split(".")
    if not all(key.split(".")):
        raise ValueError(f"--set {item}: {key!r} is not a field name (e.g. steps=10 or hmt.segment_length=128).")
    for depth, part in enumerate(parents):
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            where = ".".join(parents[: depth + 1])
            raise ValueError(f"--set {item}: {where} is {values!r}, not a mapping of options, so it has no {last!r}.")
    values[last] = value


# =========================================================================== model
def build_model(config: TrainConfig, backbone: Optional[nn.Module] = None) -> HMT:
    """The HMT to train: backbone (+ LoRA), HMT config, start checkpoint, trainable parameters."""
    if backbone is None:
        backbone, _ = bb.load_backbone(config.backbone)
    hmt_overrides = dict(config.hmt)
    if config.init_from:
        read_meta(config.init_from)  # a clear error before anything loads
        # Fields that add or reshape HMT's own modules: the checkpoint loads as it was saved,
        # then the new modules start fresh (e.g. a compression layer added in a later stage).
        structural = {k: hmt_overrides.pop(k) for k in ("memory_compression", "retrieval_dim") if k in hmt_overrides}
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


def parameter_groups(model: HMT, config: TrainConfig) -> list[dict]:
    """The trained parameters as AdamW groups: the backbone's at ``lr``, HMT's own at ``hmt_lr``."""
    return optimizer_groups(model, config.lr, config.hmt_lr, config.weight_decay)


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


# =========================================================================== data
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
            train, val = hdata.MixedDataset(train, windows, config.mix_fraction), val + documents
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


# =========================================================================== optimisation
# The layer every training loop of hmt goes through (`hmt train` here, the recall probe in
# hmt.recall): parameter groups, the learning-rate schedule, the loss of a batch, one optimizer step.
def optimizer_groups(model: HMT, lr: float, hmt_lr: Optional[float] = None, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups of the parameters that train: the backbone's at ``lr``, HMT's own (names not
    starting with ``backbone.``) at ``hmt_lr`` (``lr`` when None). Frozen parameters are left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if not HMT.is_own(n)]
    own = [p for n, p in named if HMT.is_own(n)]
    groups = [{"params": backbone, "lr": lr, "weight_decay": weight_decay}] if backbone else []
    if own:
        groups.append({"params": own, "lr": hmt_lr if hmt_lr is not None else lr, "weight_decay": weight_decay})
    return groups


def lr_factor(step: int, *, warmup_steps: int, decay: str = "constant", steps: int = 1, decay_every: int = 100,
              decay_gamma: float = 0.8, floor: float = 0.0, pi_first: bool = False) -> float:
    """The learning rate at optimizer step ``step`` (from 0) as a fraction of the base rate: a linear
    warm-up over ``warmup_steps``, then ``decay``: ``"step"`` (x ``decay_gamma`` every ``decay_every``
    steps, the paper's), ``"cosine"`` (from 1 down to ``floor`` at ``steps``) or ``"constant"``.

    ``pi_first``: the cosine's angle computed as ``(pi * elapsed) / span`` rather than
    ``pi * (elapsed / span)``. The two round differently in the last bit at some steps; the recall
    probe (:func:`hmt.recall.lr_schedule`) has always used the first, ``hmt train`` the second, and
    each keeps its learning rates to the bit."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "step":
        return decay_gamma ** ((step - warmup_steps) // decay_every)
    if decay == "cosine":
        span = max(1, steps - warmup_steps)
        if pi_first:
            angle = math.pi * min(step - warmup_steps, span) / span
        else:
            angle = math.pi * min(1.0, (step - warmup_steps) / span)
        return floor + (1 - floor) / 2 * (1 + math.cos(angle))
    return 1.0


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """:func:`lr_factor` of a run, as ``torch.optim.lr_scheduler.LambdaLR`` takes it."""
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=config.warmup_steps, decay=config.decay, steps=config.steps,
                         decay_every=config.decay_every, decay_gamma=config.decay_gamma)

    return factor


def make_optimizer(model: HMT, schedule: Callable[[int], float], lr: float, hmt_lr: Optional[float] = None,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW over :func:`optimizer_groups` and a ``LambdaLR`` scheduler with ``schedule`` (a step's
    fraction of the base rate, e.g. :func:`lr_lambda`): ``(optimizer, scheduler)``."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, hmt_lr, weight_decay), lr=lr, weight_decay=weight_decay,
                                  betas=betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def training_loss(model: HMT, batch: dict, *, use_memory: Union[bool, str] = True, bptt_depth: Optional[int] = None,
                  gradient_checkpointing: bool = False, sparse_bptt: bool = False, retrieval_loss_weight: float = 0.0,
                  return_logits: bool = False, forward: Optional[Callable] = None, autocast: Callable = contextlib.nullcontext):
    """The loss one batch trains on: ``model``'s next-token loss over ``batch`` (``input_ids``,
    ``labels``, optionally ``attention_mask`` and ``evidence_position``), each row from an empty
    memory, plus ``retrieval_loss_weight`` times :func:`supervised_retrieval_loss` (0 for a batch
    without evidence positions; nothing at weight 0). ``forward``: the module that runs the model
    (its DDP/FSDP wrapper; default ``model``), inside ``autocast()``. ``sparse_bptt``: see
    :func:`sparse_bptt_segments`. Returns ``(loss, the forward's output, the retrieval term or None)``."""
    L = model.config.segment_length
    with autocast():
        out = (forward or model)(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
            use_memory=use_memory, memory_state=model.new_memory(batch["input_ids"].shape[0]),
            return_logits=return_logits, detach_every=bptt_depth, checkpoint_segments=gradient_checkpointing,
            grad_segments=sparse_bptt_segments(batch, L) if sparse_bptt else None,
        )
    loss, retrieval = out.loss, None
    if retrieval_loss_weight > 0:  # 0 for a batch without placed evidence (e.g. mixed-in windows)
        retrieval = (supervised_retrieval_loss(out, batch["evidence_position"], batch["labels"], L)
                     if "evidence_position" in batch else out.loss.new_zeros(()))
        loss = loss + retrieval_loss_weight * retrieval
    return loss, out, retrieval


def optimizer_step(optimizer, scheduler, params: Sequence[torch.Tensor], max_grad_norm: float,
                   clip: Callable = torch.nn.utils.clip_grad_norm_):
    """Clip the gradients of ``params`` to ``max_grad_norm`` (with ``clip``), step the optimizer and
    the schedule, clear the gradients; returns the norm before clipping."""
    norm = clip(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


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


# =========================================================================== evaluation
@torch.no_grad()
def evaluate_documents(model: HMT, documents: Sequence, use_memory: Union[bool, str] = True, accelerator=None,
                       lockstep: bool = False) -> dict:
    """Token-weighted perplexity over whole documents (every token scored once) or task examples (answers).

    With ``accelerator`` the processes share the documents; ``lockstep`` (FSDP, where every forward
    gathers parameters from all processes) has every process score every document instead."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # [nll, tokens] of task answers (row 0) and of whole documents (row 1)
    sums = torch.zeros((2, 2), dtype=torch.float64, device=device)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator and not lockstep else (0, 1)
    for doc in list(documents)[rank::world]:
        if isinstance(doc, dict):  # a task example: score its labels (the answer) only
            out = score_document(model, doc["input_ids"], doc["labels"], use_memory)
        else:
            out = score_document(model, doc, use_memory=use_memory)
        kind = 0 if isinstance(doc, dict) else 1
        sums[kind, 0] += out.nll_sum.sum().double()
        sums[kind, 1] += out.num_tokens.sum().double()
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums, "sum")
    model.train(was_training)
    (answer_nll, answers), (document_nll, tokens) = sums.tolist()
    loss = (answer_nll + document_nll) / max(answers + tokens, 1)
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": int(answers + tokens)}
    if answers and tokens:  # a task mixed with documents: each apart too
        result.update(answers_ppl=math.exp(answer_nll / answers), documents_ppl=math.exp(document_nll / tokens))
    return result


# =========================================================================== training
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
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    own_data = train_data is None  # data built from config.data (else task, mix_data and their options are unused)
    precision, notes = config.precision, _without_effect(config) if own_data else []
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():  # fp16 autocast is for GPUs
        notes.append("precision: fp16 needs a CUDA GPU and this machine has none: the run is in fp32")
        precision = "fp32"
    # Several processes without a GPU (torchrun / accelerate launch --multi_gpu on a CPU
    # machine): accelerate uses gloo only when told the run is on the CPU.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=cpu_ddp)
    if cpu_ddp and _fsdp_requested():
        compat.accelerate_fsdp_on_cpu(accelerator)
    fsdp = _is_fsdp(accelerator)
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
    model = build_model(config, backbone).to(accelerator.device)
    model.train()
    supervise_retrieval = (config.retrieval_loss_weight > 0 and model.config.use_retrieval
                           and not (own_data and config.task == "documents"))
    if config.retrieval_loss_weight > 0 and not model.config.use_retrieval:
        _warn(accelerator, f"retrieval_loss_weight: {config.retrieval_loss_weight} has no effect: this stage runs with "
                           "retrieval off (hmt.use_retrieval: false), so there is no memory search to supervise")
    if supervise_retrieval:
        for note in _evidence_report(train_data, model.config):
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
        start_step = _load_training_state(checkpoint_dir, model, optimizer, scheduler, config)
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
        note = _start_metrics(metrics_path, start_step)
        if note:
            accelerator.print(f"[hmt] {note}")
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and accelerator.is_main_process), desc="train")
    step = start_step
    # tokens read (every real position of the inputs) and tokens scored (those with a label)
    tokens_seen, started = torch.zeros(2, dtype=torch.long, device=accelerator.device), time.perf_counter()
    pending = []  # steps whose figures are still on the device: read back together at the next log
    cuda = accelerator.device.type == "cuda"
    previous_term = _stop_on_sigterm()
    try:
        while step < config.steps:
            if stop_after is not None and step - start_step >= stop_after:
                interrupted = True
                break
            order = batch_order(len(train_data), step, global_batch, config.seed)
            losses, retrieval_losses = [], []
            for micro in range(config.grad_accum):
                base = micro * config.batch_size * world + rank * config.batch_size
                items = [train_data[i] for i in order[base : base + config.batch_size]]
                batch = hdata.pad_collate(items, pad_id)
                if fsdp and world > 1:  # every process must run the same segments (each layer gathers its shards)
                    batch = _pad_to_longest_across(batch, accelerator, pad_id)
                if cuda:  # page-locked, so the copy does not make the host wait for the GPU
                    batch = {k: v.pin_memory().to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                else:
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                loss, out, retrieval = training_loss(
                    model, batch, use_memory=config.use_memory, bptt_depth=config.bptt_depth,
                    gradient_checkpointing=config.gradient_checkpointing, sparse_bptt=config.sparse_bptt,
                    retrieval_loss_weight=config.retrieval_loss_weight if supervise_retrieval else 0.0,
                    forward=wrapped, autocast=accelerator.autocast)
                if supervise_retrieval:
                    retrieval_losses.append(retrieval.detach())
                loss = loss / config.grad_accum
                if config.grad_accum > 1 and micro < config.grad_accum - 1:
                    with accelerator.no_sync(wrapped):
                        accelerator.backward(loss)
                else:
                    accelerator.backward(loss)
                losses.append(out.loss.detach())
                tokens_seen += torch.stack([batch["attention_mask"].sum(), out.num_tokens.sum()]) * world
            grad_norm = optimizer_step(optimizer, scheduler, params, config.max_grad_norm,
                                       lambda p, norm: _full(accelerator.clip_grad_norm_(p, norm)))  # FSDP: a DTensor
            step += 1
            # Loss, norm and token count stay on the device until a step that logs: reading
            # them back every step would make the host wait for the GPU each time.
            extra = {"retrieval_loss": accelerator.reduce(torch.stack(retrieval_losses).mean(), "mean")} if supervise_retrieval else {}
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
                            **{k: f"{record[k]:.3f}" for k in ("retrieval_loss",) if k in record},
                            **({"val_ppl": f"{record['val_ppl']:.2f}"} if "val_ppl" in record else {}))
            if accelerator.is_main_process and logging:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            writer.add_scalar(key, value, step)
            if step % config.save_every == 0 and step < config.steps:
                _save_training_state(checkpoint_dir, model, optimizer, scheduler, step, config, accelerator)
                wrote_checkpoint = True
    except KeyboardInterrupt:
        interrupted = True
        accelerator.print(f"\n[hmt] interrupted at step {step}: saving a checkpoint to resume from")
    finally:
        _read_back(pending, history, tokens_seen, started)
        bar.close()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if interrupted:
        _save_training_state(checkpoint_dir, model, optimizer, scheduler, step, config, accelerator)
        return TrainResult(steps=step, final_dir=None, history=history, eval=eval_result, interrupted=True)
    final_dir = out_dir / "final"
    full_state = _full_state_dict(model) if fsdp else None  # every process takes part in gathering it
    if accelerator.is_main_process:
        checkpoint.save(model, final_dir, trained_backbone=_trained_kind(config), state_dict=full_state)
        if wrote_checkpoint:
            _remove_training_state(checkpoint_dir)
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    return TrainResult(steps=step, final_dir=str(final_dir), history=history, eval=eval_result)


def sparse_bptt_segments(batch: dict, segment_length: int) -> Optional[list[int]]:
    """The segments that run with autograd under evidence-sparse BPTT (``sparse_bptt``): for each
    row, the segment where its evidence begins and every segment that scores one of its labels
    (label t is predicted at position t - 1); the union over the batch's rows. None (full BPTT)
    when the batch has no evidence positions or a row's evidence is unknown, as in language-model
    windows. Rows are right-padded (``pad_collate``), so positions are the model's own."""
    evidence = batch.get("evidence_position")
    if evidence is None or bool((evidence < 0).any()):
        return None
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()  # predicting positions
    return sorted(set((evidence // segment_length).tolist()) | set((labelled // segment_length).tolist()))


def retrieval_loss(
    out,
    evidence_segments: torch.Tensor,
    query_segments: Union[int, torch.Tensor],
    kind: str = "cross_entropy",
) -> torch.Tensor:
    """The supervised retrieval signal: the query segment's search should land on the evidence.

    For each example, take the search distribution ``w (C,)`` of its query segment over the cache
    (``out.retrieval_weights[q]``) and mark the entries written by the evidence segment
    (``out.retrieved_segments[q] == evidence``):

    * ``"cross_entropy"`` (the paper's code's): ``-sum_c p_c log w_c`` with ``p`` the evidence mask
      normalised to sum 1, i.e. a cross-entropy of the search scores against that soft target;
    * ``"mass"``: ``-log sum_{c in evidence} w_c``, the weight mass on the evidence.

    With one evidence entry (one evidence segment per example, as in :func:`make_batch`) the two
    are equal. Examples whose evidence is no longer in the cache (pushed out by FIFO) or whose
    query segment has an empty cache are left out of the mean. The paper's code adds
    ``0.05 *`` this to the LM loss.

    Args:
        out: an :class:`hmt.HMTOutput` of a forward with memory (``retrieval_weights``: per segment
            ``(B, C)``; ``retrieved_segments``: per segment ``(B, C)``, -1 for empty slots).
        evidence_segments: ``(B,)`` stream segment index of the evidence (as ``make_batch`` gives;
            for a stream continued from an earlier ``memory_state`` these are stream indices);
            -1 leaves the row out (no known evidence).
        query_segments: ``(B,)`` or an int: index of the query segment *within this call's*
            segments (``out.retrieval_weights[q]``).
        kind: ``"cross_entropy"`` or ``"mass"``.

    Returns:
        A scalar tensor (0 with no gradient when no example has its evidence in the cache).
    """
    if out.retrieval_weights is None:
        raise ValueError("retrieval_loss needs an output of a forward with memory (use_memory=True).")
    if kind not in ("cross_entropy", "mass"):
        raise ValueError(f"kind must be 'cross_entropy' or 'mass', got {kind!r}.")
    B = evidence_segments.shape[0]
    queries = torch.as_tensor(query_segments).reshape(-1).expand(B)  # an int or (B,): one per example
    losses = []
    for row in range(B):
        q = int(queries[row])
        weights = out.retrieval_weights[q][row].float()  # (C,)
        retrieved_segments = out.retrieved_segments[q][row]  # (C,) the segment that wrote each entry
        evidence = int(evidence_segments[row])
        mask = retrieved_segments == evidence
        if evidence < 0 or weights.numel() == 0 or not bool(mask.any()):  # -1: no known evidence
            continue
        if kind == "mass":
            losses.append(-torch.log((weights * mask).sum().clamp_min(1e-30)))
        else:
            target = mask.float() / mask.sum()
            losses.append(-(target * torch.log(weights.clamp_min(1e-30))).sum())
    if not losses:
        return out.retrieval_weights[0].new_zeros(())
    return torch.stack(losses).mean()


def supervised_retrieval_loss(out, evidence_positions: torch.Tensor, labels: torch.Tensor, segment_length: int):
    """The paper's supervised retrieval term for a batch of task examples.

    Row b's evidence begins at token ``evidence_positions[b]`` (-1: unknown, row left out), so
    the memory written by segment ``evidence // L`` holds it; the answer's first token is
    predicted at the position before the first labelled one, in segment ``(start - 1) // L``,
    whose memory search should land on that memory. See :func:`retrieval_loss`.
    """
    labelled = labels != IGNORE_INDEX
    first = torch.where(labelled.any(1), labelled.long().argmax(1), torch.zeros_like(labelled[:, 0], dtype=torch.long))
    evidence = torch.where(evidence_positions >= 0, evidence_positions // segment_length, -1)
    query = ((first - 1).clamp(min=0) // segment_length).clamp(max=len(out.retrieval_weights) - 1)
    return retrieval_loss(out, evidence.to(labels.device), query)


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


def _without_effect(config: TrainConfig) -> list[str]:
    """Fields this run sets that do nothing, each as a sentence saying so."""
    notes = []
    if config.mix_data is not None and config.mix_fraction == 0:
        notes.append("mix_data has no effect with mix_fraction: 0 (no language-model window is mixed in); "
                     "set mix_fraction, e.g. 0.25")
    if config.mix_data is None and config.mix_data_options:
        notes.append("mix_data_options has no effect without mix_data")
    if config.task == "documents" and config.qa_options:
        notes.append("qa_options has no effect with task: documents (they are for task: qa)")
    if config.task == "documents" and config.retrieval_loss_weight > 0:
        notes.append(f"retrieval_loss_weight: {config.retrieval_loss_weight} has no effect with task: documents "
                     "(language-model windows name no evidence); it supervises task: qa examples with an evidence field")
    return notes


def _evidence_report(train_data, hmt_config: HMTConfig) -> list[str]:
    """Check that the supervised retrieval loss has task examples to act on.

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
        if position >= 0:
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
            f"retrieval_loss_weight > 0, but no training example's evidence can be placed ({detail}). Give rows an "
            "'evidence' field holding a passage of their context (data_options.evidence_field names another), or set "
            "retrieval_loss_weight: 0."
        )
    return [f"the retrieval loss skips {missing} of {len(tasks)} training examples whose evidence cannot be placed: "
            f"{detail}"]


def _start_metrics(path: Path, start_step: int) -> Optional[str]:
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


def _stop_on_sigterm():
    """Treat SIGTERM (a scheduler preempting the job, `kill`) like Ctrl-C: save, then stop."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _trained_kind(config: TrainConfig) -> str:
    """What of the backbone the final checkpoint must hold: what this run trained, or, for a
    memory-only run, what its start checkpoint already carried (e.g. a frozen LoRA)."""
    if config.trainable == "memory":
        return read_meta(config.init_from).get("trained_backbone", "none") if config.init_from else "none"
    return config.trainable


def _tensorboard(out_dir: Path, config: TrainConfig):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("tensorboard: true needs the tensorboard package: pip install tensorboard") from err
    return SummaryWriter(str(out_dir / "tensorboard"))


def _save_training_state(directory: Path, model: HMT, optimizer, scheduler, step: int, config: TrainConfig, accelerator) -> None:
    """Write everything a resumed run needs, atomically (a crash leaves the previous checkpoint)."""
    accelerator.wait_for_everyone()
    # Under FSDP each process holds shards: every process gathers the full tensors (in the same order).
    trained = {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}
    optimizer_state = _full_tree(optimizer.state_dict())
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


def _remove_training_state(directory: Path) -> None:
    """Remove the training state this run wrote in ``directory``, and the folder if nothing else is in it
    (files a user keeps there stay)."""
    (directory / STATE_NAME).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not empty (or gone): leave it
        pass


def _load_training_state(directory: Path, model: HMT, optimizer, scheduler, config: TrainConfig) -> int:
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
            named[name].copy_(_shard_like(value, named[name]))
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # FSDP: the saved full moments, sharded like their parameters
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    moments[key] = _shard_like(value, param)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# =========================================================================== FSDP
def _fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (distributed_type: FSDP) says so in the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _full(tensor):
    """The whole tensor of an FSDP shard (a DTensor; a collective: every process must call it); others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _full_tree(value):
    if isinstance(value, dict):
        return {k: _full_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_full_tree(v) for v in value)
    return _full(value).cpu() if torch.is_tensor(value) else value


def _shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out like ``param`` (sharded under FSDP)."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements)


def _full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict, gathered from every process's shards (on every process)."""
    return {name: _full(value.detach()).cpu() for name, value in model.state_dict().items()}


def _pad_to_longest_across(batch: dict, accelerator, pad_id: int) -> dict:
    """Right-pad a micro-batch to the longest one of any process (labels -100, mask 0)."""
    length = torch.tensor([batch["input_ids"].shape[1]], device=accelerator.device)
    longest = int(accelerator.gather(length).max())
    extra = longest - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}


def run_recipe(path: str, stages: Optional[Sequence[str]] = None, overrides: Sequence[str] = (), resume: bool = True) -> list[TrainResult]:
    """Run a recipe's stages in order (or only ``stages``)."""
    results = []
    recipe = load_recipe(path, overrides)
    unknown = [name for name in stages or () if name not in {name for name, _ in recipe}]
    if unknown:
        raise ValueError(f"Recipe {path} has no stage {', '.join(map(repr, unknown))}; its stages: "
                         f"{', '.join(name for name, _ in recipe)}.")
    for name, config in recipe:
        if stages and name not in stages:
            continue
        if (Path(config.output_dir) / "final" / "hmt_config.json").is_file() and not stages:
            print(f"[hmt] stage {name}: {config.output_dir}/final exists, skipping (pass --stage {name} to rerun)")
            continue
        print(f"[hmt] stage {name} -> {config.output_dir}")
        result = train(config, resume=resume)
        results.append(result)
        if result.interrupted:
            break
    return results


def fields_help() -> str:
    lines = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        accepts = f"; {_accepts(f)}" if _declared(f)[0] in (int, float, bool) else ""
        lines.append(f"  {f.name} (default {default!r}{accepts}): {f.metadata.get('help', '')}".rstrip(": "))
    return "\n".join(lines)
