"""Training HMT: BPTT over unrolled segments, the paper's two-stage recipe, exact resume.

The CLI (``hmt train --config recipe.yaml``) and the Python API (:func:`train`) are the
same code. It runs as one process or under ``accelerate launch`` (DDP, or FSDP2 with
recipes/accelerate/fsdp.yaml, also on CPUs); every process draws its share of the same
global batch, so the result does not depend on how many processes there are.

One module per concern, bottom to top:

* :mod:`~hmt.training.config`: :class:`TrainConfig`, its fields checked by their declared types;
* :mod:`~hmt.training.build`: the model (backbone, LoRA, start checkpoint, what trains) and the data;
* :mod:`~hmt.training.optim`: parameter groups, the learning-rate schedule, one optimizer step
  (the recall probe, :mod:`hmt.recall`, trains through these too);
* :mod:`~hmt.training.objective`: the loss of a batch (and the supervised retrieval term);
* :mod:`~hmt.training.evaluation`: validation perplexity;
* :mod:`~hmt.training.distributed`: the accelerator, DDP/FSDP collectives;
* :mod:`~hmt.training.state`: the training state for exact resume, the metrics log;
* :mod:`~hmt.training.loop`: :func:`train`, one stage;
* :mod:`~hmt.training.recipe`: YAML recipes of stages, ``--set`` overrides, :func:`run_recipe`.
"""

from .build import build_data, build_model, set_trainable
from .config import TRAINABLE, TrainConfig, fields_help
from .evaluation import evaluate_documents
from .loop import TrainResult, batch_order, train
from .objective import distill_loss, retrieval_loss, sparse_bptt_segments, supervised_retrieval_loss, training_loss, write_loss
from .optim import lr_factor, lr_lambda, make_optimizer, optimizer_groups, optimizer_step, parameter_groups
from .recipe import load_recipe, run_recipe
from .state import STATE_NAME

__all__ = [
    "STATE_NAME",
    "TRAINABLE",
    "TrainConfig",
    "TrainResult",
    "batch_order",
    "build_data",
    "build_model",
    "distill_loss",
    "evaluate_documents",
    "fields_help",
    "load_recipe",
    "lr_factor",
    "lr_lambda",
    "make_optimizer",
    "optimizer_groups",
    "optimizer_step",
    "parameter_groups",
    "retrieval_loss",
    "run_recipe",
    "set_trainable",
    "sparse_bptt_segments",
    "supervised_retrieval_loss",
    "train",
    "training_loss",
    "write_loss",
]
