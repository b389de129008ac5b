"""Saving and loading what HMT trained: safetensors plus JSON, never pickles.

A directory written by :meth:`hmt.HMT.save_pretrained` holds

- ``hmt_config.json``: the :class:`~hmt.HMTConfig`;
- ``hmt_meta.json``: format version, a description of the backbone it was trained on,
  what of the backbone was trained (``"none"``, ``"lora"`` or ``"full"``) and the LoRA
  config when used;
- ``hmt_weights.safetensors``: HMT's own parameters (``hmt.*``), plus the LoRA weights
  (``lora.*``) or the full backbone (``backbone.*``) when those were trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import backbone as bb
from .compat import lora_config
from .config import CONFIG_NAME, HMTConfig
from .constants import BACKBONE_PREFIX, is_own
from .fingerprint import (backbone_signature, embedding_checksum, legacy_fingerprint_matches, memory_origin,  # noqa: F401
                          same_weights, trained_since)
from .utils import chmod_as_created

FORMAT_VERSION = 1
META_NAME = "hmt_meta.json"
WEIGHTS_NAME = "hmt_weights.safetensors"


def _check_same_weights(directory: Path, meta: dict, backbone: torch.nn.Module) -> None:
    saved = meta.get("embedding_checksum")
    if not saved:
        return
    same = same_weights(saved, backbone)
    if same == "dtype":
        import warnings

        warnings.warn(f"{directory} was saved with the backbone in {saved['dtype']}; this one is in "
                      f"{embedding_checksum(backbone)['dtype']} (the same weights otherwise): results may differ "
                      "slightly.", stacklevel=3)
    if same is None:
        raise ValueError(
            f"{directory} was trained on a backbone with the same architecture but other weights (embedding checksum "
            "differs). Load it into the backbone it was trained on."
        )


def _check_full_base(directory: Path, meta: dict, backbone: torch.nn.Module, tensors: dict) -> None:
    """A full checkpoint replaces the backbone's weights in place: only in the backbone it was
    trained from (or one that already holds its weights), never in another of the same architecture."""
    base = meta.get("base_embedding_checksum")
    if not base or same_weights(base, backbone):
        return
    inner = bb.unwrap(backbone)
    weight = inner.get_input_embeddings().weight
    name = next((n for n, p in inner.named_parameters() if p is weight), None)
    saved = tensors.get(f"{BACKBONE_PREFIX}{name}")
    if saved is not None and saved.shape == weight.shape and torch.allclose(
            saved[:64].float(), weight.detach()[:64].float().cpu(), rtol=1e-2, atol=1e-3):
        return  # it already holds the trained weights
    raise ValueError(
        f"{directory} holds a fully trained backbone trained from other weights than this backbone's (embedding "
        "checksum differs): loading it would overwrite this backbone's weights in place. Pass the backbone it was "
        "trained from (a fresh load_backbone())."
    )


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_backbone_kind(model) -> str:
    """What of ``model``'s backbone a checkpoint must hold: ``"lora"`` for a PEFT backbone,
    ``"full"`` when its weights changed since HMT was built around it (an optimizer step, a weight
    load: whatever bumps a parameter's version) or came from a full checkpoint, else ``"none"``
    (the base weights, which the checkpoint names instead of holding). Whether parameters still
    have ``requires_grad`` says nothing: ``load_backbone()`` leaves it on."""
    backbone = model.backbone
    if bb.unwrap(backbone) is not backbone:  # a PEFT wrapper
        return "lora"
    if getattr(model, "trained_backbone", None) == "full":
        return "full"
    record = getattr(model, "backbone_at_init", None)
    if record is None:  # built without a record (an object restored by other means): the safe answer
        return "full" if any(p.requires_grad for p in backbone.parameters()) else "none"
    return "full" if trained_since(record, backbone) else "none"


def save(model, directory: str | os.PathLike, trained_backbone: str | None = None,
         dtype: torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """``state_dict``: the model's full ``state_dict()`` when the model itself holds only shards
    (FSDP: the trainer gathers it first); by default ``model.state_dict()``."""
    from safetensors.torch import save_file

    kind = trained_backbone or trained_backbone_kind(model)
    if kind not in ("none", "lora", "full"):
        raise ValueError(f"trained_backbone must be 'none', 'lora' or 'full', got {kind!r}.")
    state = model.state_dict() if state_dict is None else state_dict
    backbone_state = _strip(state, BACKBONE_PREFIX)
    tensors = {f"hmt.{k}": v for k, v in state.items() if is_own(k)}
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "backbone": backbone_signature(model.backbone),
        "trained_backbone": kind,
    }
    if kind == "lora":
        from peft import get_peft_model_state_dict

        peft_config = model.backbone.peft_config["default"]
        meta["lora_config"] = json.loads(json.dumps(peft_config.to_dict(), default=_jsonable))
        base = meta["lora_config"].get("base_model_name_or_path")
        if base:  # a name, not this machine's path
            meta["lora_config"]["base_model_name_or_path"] = Path(str(base)).name
        lora_state = get_peft_model_state_dict(model.backbone, state_dict=backbone_state)
        tensors.update({f"lora.{k}": v for k, v in lora_state.items()})
    elif kind == "full":
        inner = bb.unwrap(model.backbone)
        prefix = next(n for n, m in model.backbone.named_modules() if m is inner)
        tensors.update({f"backbone.{k}": v for k, v in (_strip(backbone_state, prefix + ".") if prefix else backbone_state).items()})
    table = _embedding_table(model, state) if state_dict is not None else None
    if kind in ("none", "lora"):  # the base weights are not saved: they must be the same at load
        meta["embedding_checksum"] = embedding_checksum(model.backbone, table)
    else:  # the weights it was trained from: only those (or these) are overwritten at load
        base = getattr(model, "base_embedding_checksum", None) or (getattr(model, "backbone_at_init", None) or {}).get("embedding_checksum")
        if base:
            meta["base_embedding_checksum"] = base
    meta["config"] = model.config.to_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if dtype is not None:  # e.g. bfloat16 to ship a small adapter; loading casts back
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _dedupe_shared(tensors)

    target = _check_target(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except PermissionError:
        raise PermissionError(f"Cannot write {directory}: permission denied in {target.parent}. Save it elsewhere.") from None
    try:
        model.config.save(staging)
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "hmt", "version": str(FORMAT_VERSION)})
        meta["weights_sha256"] = _file_sha256(staging / WEIGHTS_NAME)
        (staging / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        chmod_as_created(staging / WEIGHTS_NAME)  # like the JSON beside it (safetensors writes 0600)
        chmod_as_created(staging, 0o777)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _embedding_table(model, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's input-embedding table as it appears in ``state`` (a full state dict)."""
    weight = bb.unwrap(model.backbone).get_input_embeddings().weight
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is weight and name in state:
            return state[name]
    raise ValueError("The state dict given to save() lacks the backbone's input embeddings.")


def _check_target(directory: str | os.PathLike) -> Path:
    """The folder save_pretrained writes: not the current folder or one above it, not read-only."""
    target = Path(directory)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or not target.name or target.name in (".", ".."):
        raise ValueError(
            f"save_pretrained({str(directory)!r}) would replace the current folder or one above it; "
            "give a new or checkpoint folder inside it, e.g. 'checkpoint'."
        )
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{directory} is a file; save_pretrained writes a folder. Give a folder name.")
        if not (target.stat().st_mode & 0o200) or not os.access(target, os.W_OK):
            raise PermissionError(
                f"Cannot write {directory}: the folder is read-only. Make it writable (chmod u+w) or save elsewhere."
            )
    return target


def load(cls, backbone: torch.nn.Module, directory: str | os.PathLike, **config_overrides) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve(directory)
    config = HMTConfig.load(directory)
    meta = read_meta(directory)
    saved = meta.get("config")
    # A field added after the adapter was saved is absent from its files: it has its default.
    defaults = {f.name: f.default for f in dataclasses.fields(HMTConfig)}
    current = config.to_dict()
    changed = [] if saved is None else sorted(
        k for k in set(saved) | set(current) if saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k)))
    if changed:
        raise ValueError(
            f"{directory / CONFIG_NAME} differs from the configuration the weights were trained with (fields "
            f"{changed}: trained {[saved.get(k) for k in changed]}, file {[config.to_dict().get(k) for k in changed]}). "
            f"Restore the file; pass a different value as an argument (from_pretrained(..., {changed[0]}=...)) to try one."
        )
    if config_overrides:
        config = HMTConfig.from_dict({**config.to_dict(), **config_overrides})
    expected, actual = meta.get("backbone", {}), backbone_signature(backbone)
    mismatched = {k: (expected.get(k), actual[k]) for k in actual if expected.get(k) != actual[k]}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs backbone {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"{directory} was trained on another backbone ({details}). Load it into the backbone it was trained on.")
    kind = meta.get("trained_backbone")
    if kind == "none" and "embedding_fingerprint" in meta and "embedding_checksum" not in meta:
        if not legacy_fingerprint_matches(meta["embedding_fingerprint"], backbone):  # a checkpoint older than the checksum
            raise ValueError(
                f"{directory} was trained on a backbone with the same architecture but other weights "
                "(embedding checksum differs). Load it into the backbone it was trained on."
            )
    _check_same_weights(directory, meta, backbone)
    weights = directory / WEIGHTS_NAME
    if meta.get("weights_sha256") and weights.is_file() and _file_sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights} is corrupt: its SHA-256 differs from the one recorded in {META_NAME} when it was "
                         "saved. Restore the checkpoint from a good copy.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is missing or corrupt ({err}).") from err
    broken = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:
        raise ValueError(f"{weights} holds NaN or infinite values in {broken[:5]}: the training that wrote it diverged. "
                         "Use an earlier checkpoint or retrain with a lower learning rate.")

    if kind == "lora":
        from peft import get_peft_model, set_peft_model_state_dict

        if bb.unwrap(backbone) is backbone:
            backbone = get_peft_model(backbone, lora_config(meta["lora_config"], directory))
        result = set_peft_model_state_dict(backbone, _strip(tensors, "lora."))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA weights in {directory} do not fit the backbone: {unexpected[:5]}")
    elif kind == "full":
        _check_full_base(directory, meta, backbone, tensors)
        inner = bb.unwrap(backbone)
        missing, unexpected = inner.load_state_dict(_strip(tensors, BACKBONE_PREFIX), strict=False)
        missing = [k for k in missing if k not in _tied_aliases(inner)]  # tied weights are saved once
        if missing or unexpected:
            raise ValueError(f"Backbone weights in {directory} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = cls(backbone, config)
    own = _strip(tensors, "hmt.")
    expected_keys = {k for k in model.state_dict() if is_own(k)}
    if set(own) != expected_keys:
        raise ValueError(
            f"{directory} does not match this HMT config: missing {sorted(expected_keys - set(own))}, "
            f"unexpected {sorted(set(own) - expected_keys)}."
        )
    try:
        model.load_state_dict(own, strict=False)
    except RuntimeError as err:
        raise ValueError(f"HMT weights in {directory} do not fit the config: {err}") from err
    model.checkpoint_name = f"checkpoint {directory.name}" if directory.parent != SHIPPED_DIR else f"adapter {directory.name}"
    if kind == "full":  # saving it again must hold the backbone, and name the weights it was trained from
        model.trained_backbone = "full"
        model.base_embedding_checksum = meta.get("base_embedding_checksum")
    return model


SHIPPED_DIR = Path(__file__).resolve().parent / "adapters"


def shipped_adapters() -> list[str]:
    """Names of the adapters that ship with the library (``hmt/adapters/NAME``)."""
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / META_NAME).is_file()) if SHIPPED_DIR.is_dir() else []


# Names of adapters that shipped before and now load another: 0.2's recall adapter became the
# default adapter in 0.3 (the default of 0.2 ships as smollm2-135m-lm).
RENAMED_ADAPTERS = {"smollm2-135m-recall": "smollm2-135m"}


def resolve(directory: str | os.PathLike) -> Path:
    """A checkpoint directory, or the name of a shipped adapter (e.g. ``"smollm2-135m"``)."""
    path = Path(directory)
    if path.is_dir():
        return path
    name = RENAMED_ADAPTERS.get(str(directory), str(directory))
    if (SHIPPED_DIR / name).is_dir():
        return SHIPPED_DIR / name
    raise FileNotFoundError(
        f"{directory} is not a directory written by HMT.save_pretrained, nor a shipped adapter "
        f"({', '.join(shipped_adapters()) or 'none installed'})."
    )


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = resolve(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {META_NAME} in {directory}: not an HMT checkpoint (expected {CONFIG_NAME}, {META_NAME}, {WEIGHTS_NAME}).")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}).") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')!r}; this hmt reads {FORMAT_VERSION}.")
    return meta


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): keep one copy."""
    seen: dict[tuple, str] = {}
    for name in list(tensors):  # state-dict order: the embedding comes before a tied head
        t = tensors[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            del tensors[name]
        else:
            seen[key] = name


def _tied_aliases(module: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return aliases


def replace_dir(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` so that a crash leaves either the old or the new directory.

    Files of ``target`` that ``staging`` does not hold (a README, a recipe, logs) are carried over.
    """
    if target.exists():
        for entry in target.iterdir():
            dest = staging / entry.name
            if dest.exists():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, dest)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))  # never a user's folder
        os.rmdir(old)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _link_or_copy(src, dst) -> None:
    """A hard link (staging sits beside the target, on the same file system), else a copy."""
    try:
        if os.path.islink(src):
            raise OSError("a symbolic link is copied as a link")
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return str(value)
