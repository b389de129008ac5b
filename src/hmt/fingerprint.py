"""Fingerprints: what tells one backbone, one set of weights and one trained HMT from another.

* :func:`backbone_signature`: the architecture (model type, vocabulary, width, depth);
* :func:`embedding_checksum`: the weights, by the first rows of the input embeddings (SHA-256,
  and their sums to recognise the same weights in another dtype; :func:`same_weights`);
* :func:`backbone_record`: the backbone as HMT received it (each parameter's in-place version
  and its checksum), to tell later whether it was trained since (:func:`trained_since`);
* :func:`memory_origin`: the model a memory file belongs to (backbone and adapter).

Checkpoints (:mod:`hmt.checkpoint`) and memory files (:class:`hmt.MemoryState`) record them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
from torch import nn

from . import backbone as bb

CHECKSUM_ROWS = 64  # rows of the input embeddings a checksum reads


def backbone_signature(backbone: nn.Module) -> dict[str, Any]:
    """What must match between the backbone a checkpoint was trained on and the one it is loaded into."""
    config = bb.text_config(backbone)
    inner = bb.unwrap(backbone)
    table = inner.get_input_embeddings().weight
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return {
        "model_type": getattr(config, "model_type", type(inner).__name__),
        "vocab_size": int(table.shape[0]),
        "embedding_dim": int(table.shape[1]),
        "num_layers": layers,
    }


def embedding_checksum(backbone: nn.Module, table: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """A tight fingerprint of the backbone's weights: the SHA-256 of the first 64 rows of its input
    embeddings (exact, in their dtype) and those rows' sums (to recognise the same weights in
    another dtype). ``table``: those embeddings when the module holds only a shard of them (FSDP)."""
    if table is None:
        table = bb.unwrap(backbone).get_input_embeddings().weight
    table = table.detach()[:CHECKSUM_ROWS].cpu().contiguous()
    digest = hashlib.sha256(table.view(torch.uint8).numpy().tobytes() if table.numel() else b"").hexdigest()
    return {"sha256": digest, "dtype": str(table.dtype).replace("torch.", ""),
            "row_sums": [round(float(x), 6) for x in table.double().sum(-1)]}


def same_weights(saved: dict, backbone: nn.Module) -> Optional[str]:
    """Whether ``backbone`` holds the weights :func:`embedding_checksum` ``saved`` describes: ``"same"``,
    ``"dtype"`` (the same weights in another dtype), or None (other weights)."""
    now = embedding_checksum(backbone)
    if now["sha256"] == saved["sha256"]:
        return "same"
    if now["dtype"] != saved["dtype"] and len(now["row_sums"]) == len(saved["row_sums"]):
        a, b = torch.tensor(saved["row_sums"]), torch.tensor(now["row_sums"])
        width = bb.embedding_dim(backbone)
        if bool(((a - b).abs() <= 2e-2 * (a.abs() + width ** 0.5 * 1e-2) + 1e-3).all()):
            return "dtype"
    return None


def legacy_fingerprint_matches(saved: float, backbone: nn.Module) -> bool:
    """For checkpoints written before :func:`embedding_checksum` existed, which hold only
    ``embedding_fingerprint``: the absolute sum of the first 64 embedding rows (rounded to 3
    places), within 1% (the same weights in another dtype pass). Nothing writes it any more."""
    table = bb.unwrap(backbone).get_input_embeddings().weight.detach()
    now = round(float(table[: min(CHECKSUM_ROWS, table.shape[0])].double().abs().sum()), 3)
    return abs(saved - now) <= 1e-2 * max(1.0, saved)


def parameter_versions(backbone: nn.Module) -> dict[str, int]:
    """Each parameter's in-place version counter (an optimizer step or a weight load bumps it)."""
    return {n: p._version for n, p in backbone.named_parameters()}


def backbone_record(backbone: nn.Module) -> dict:
    """The backbone as HMT received it: :func:`parameter_versions` and the :func:`embedding_checksum`
    of its weights (None on the meta device); :func:`trained_since` tells from it whether the
    backbone was trained since, and a full checkpoint names the weights it started from."""
    weight = bb.unwrap(backbone).get_input_embeddings().weight
    return {"versions": parameter_versions(backbone),
            "embedding_checksum": None if weight.device.type == "meta" else embedding_checksum(backbone)}


def trained_since(record: dict, backbone: nn.Module) -> bool:
    """Whether any parameter of ``backbone`` changed in place since :func:`backbone_record` took ``record``."""
    return parameter_versions(backbone) != record["versions"]


def memory_origin(model) -> dict[str, str]:
    """Which model a memory belongs to, as a memory file records it: the backbone (model type and
    :func:`embedding_checksum`) and the adapter (the checkpoint it was loaded from, and the SHA-256
    of HMT's own parameters and any LoRA weights: what turns the same backbone into another memory).
    ``model``: an :class:`hmt.HMT`."""
    backbone = model.backbone
    kind = backbone_signature(backbone)["model_type"]
    digest = hashlib.sha256()
    tensors = dict(model.own_state_dict())
    if bb.unwrap(backbone) is not backbone:  # LoRA: its weights shape what the memory encodes too
        tensors.update({f"lora.{n}": p for n, p in backbone.named_parameters() if "lora_" in n})
    for name in sorted(tensors):
        t = tensors[name].detach().float().contiguous().cpu()
        digest.update(name.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"backbone": f"{kind}, {bb.vocab_size(backbone)} x {bb.embedding_dim(backbone)}",
            "backbone_sha256": embedding_checksum(backbone)["sha256"],
            "adapter": getattr(model, "checkpoint_name", None) or "an HMT not loaded from a checkpoint",
            "adapter_sha256": digest.hexdigest()}
