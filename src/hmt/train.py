"""``hmt.train``: the trainer's names where they have always been (``hmt.train.train``,
``hmt.train.TrainConfig``, ...). The trainer itself is the package :mod:`hmt.training`."""

from .training import (STATE_NAME, TRAINABLE, TrainConfig, TrainResult, batch_order, build_data, build_model,
                       evaluate_documents, fields_help, load_recipe, lr_factor, lr_lambda, make_optimizer,
                       optimizer_groups, optimizer_step, parameter_groups, retrieval_loss, run_recipe, set_trainable,
                       sparse_bptt_segments, supervised_retrieval_loss, train, training_loss)

__all__ = [
    "STATE_NAME",
    "TRAINABLE",
    "TrainConfig",
    "TrainResult",
    "batch_order",
    "build_data",
    "build_model",
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
]
