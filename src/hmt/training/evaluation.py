"""Validation during training: token-weighted perplexity over whole documents or task answers."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ..evaluate import score_document
from ..model import HMT


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
