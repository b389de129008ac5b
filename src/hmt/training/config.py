"""What a training run is: :class:`TrainConfig`, each field checked against its declared type and range.

The fields' types (``int``, ``float``, ``Optional[...]``, ...) and the bounds in their metadata
drive the checks, the coercion of YAML and ``--set`` values (``1e-4`` read as a string becomes a
float) and the help (``hmt train --help-fields``): there is no list of fields to keep by hand.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence, Union

from .. import data as hdata
from ..config import HMTConfig


TRAINABLE = ("memory", "lora", "full")


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
    write_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the write loss: on task examples whose evidence is known, the memory the "
                          "evidence's segment wrote, read as a token (softmax of m . E over the input embeddings), "
                          "must name the answer's first non-blank token. It makes the memory token-like for what "
                          "the answer needs, which SmolLM2 could then read within a few hundred examples (1.0 in "
                          "benchmarks/recall_read.py). Logged as write_loss.", "min": 0},
    )
    distill_from: Optional[str] = field(
        default=None,
        metadata={"help": "An HMT checkpoint (adapter name or directory) whose next-token distributions the trained "
                          "model must keep (distill_weight): a teacher read on the same inputs, from an empty memory, "
                          "without gradient. Keeps a model taught a task close to what it was on everything else."},
    )
    distill_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(teacher || model) of the next-token distributions (distill_from): over every "
                          "position of a language-model row, and over the context of a task row (the positions whose "
                          "next token carries no loss), so the answer itself is free to differ from a teacher that "
                          "does not know it. Logged as distill_loss.", "min": 0},
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
    sparse_negatives: int = field(
        default=0,
        metadata={"help": "With sparse_bptt: this many other segments of each batch, drawn at random, also run with "
                          "autograd (distractors whose memories the search learns to tell from the evidence's; "
                          "2 made the recall probe learn where plain sparse BPTT did not).", "min": 0},
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
        if self.distill_weight > 0 and not self.distill_from:
            raise ValueError("TrainConfig.distill_weight needs distill_from: the HMT checkpoint (adapter name or directory) "
                             "whose next-token distributions the model must keep, e.g. distill_from: smollm2-135m.")
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


def fields_help() -> str:
    lines = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        accepts = f"; {_accepts(f)}" if _declared(f)[0] in (int, float, bool) else ""
        lines.append(f"  {f.name} (default {default!r}{accepts}): {f.metadata.get('help', '')}".rstrip(": "))
    return "\n".join(lines)
