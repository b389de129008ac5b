"""Where hmt meets a dependency that changed between the versions it supports.

Each gate here is one place that knows how two versions of transformers, huggingface_hub, peft
or accelerate differ, and what hmt does about it; the rest of hmt calls these and stays free of
version checks. The KV cache has its own fence (:mod:`hmt.kv_cache`): its gates live there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from torch import nn


# ------------------------------------------------------------------ transformers
def text_config(config):
    """The text model's config of a (possibly multimodal) model config: ``get_text_config()`` where
    transformers has it, the config itself before."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_stack_of(model: nn.Module) -> Optional[nn.Module]:
    """The decoder stack of a (non-PEFT) causal LM, or None when it has none apart from itself:
    ``base_model``, or the ``model`` attribute where ``base_model`` is the model itself (e.g.
    Gemma3ForCausalLM in transformers 4.x, whose base-model prefix is not an attribute)."""
    stack = getattr(model, "base_model", None)
    if stack is None or stack is model:
        stack = getattr(model, "model", None)
    return stack if isinstance(stack, nn.Module) and stack is not model else None


# ------------------------------------------------------------------ huggingface_hub
def hub_validation_error() -> type:
    """huggingface_hub's error for a name that is neither a local directory nor a valid model id
    (a ValueError; transformers 5 turns it into an OSError, 4.x does not)."""
    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # older huggingface_hub
        try:
            from huggingface_hub.utils import HFValidationError
        except ImportError:
            return OSError
    return HFValidationError


# ------------------------------------------------------------------ peft
# LoRA settings a peft older than the one that saved a checkpoint may not know. An unknown field
# is dropped only when it holds a value that switches nothing on (a feature left off); one that
# is set means the adapter needs that feature, so loading it without would give other weights.
LORA_METADATA = {"peft_version", "base_model_name_or_path"}  # what saved it and where: no effect on the weights
LORA_DEPENDENT = {"qalora_group_size": "use_qalora"}  # read only when the other field is on


def lora_config(saved: dict[str, Any], directory: str | os.PathLike = "the checkpoint"):
    """A ``peft.LoraConfig`` from the LoRA settings a checkpoint holds (``LoraConfig.to_dict()`` of
    the peft that saved it), for the installed peft: fields this peft does not know are dropped when
    they leave a feature off, and refused (with what to do) when they turn one on."""
    import peft
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kept, needed = {}, {}
    for key, value in saved.items():
        if key in LORA_METADATA:
            continue
        if key in known:
            kept[key] = value
        elif value in (None, False, {}, [], "") or (key in LORA_DEPENDENT and not saved.get(LORA_DEPENDENT[key])):
            continue
        else:
            needed[key] = value
    if needed:
        raise ValueError(
            f"The LoRA adapter in {directory} uses settings peft {peft.__version__} does not know: "
            f"{', '.join(f'{k}={v!r}' for k, v in sorted(needed.items()))} (saved with peft "
            f"{saved.get('peft_version', 'of another version')}). Upgrade peft: pip install -U peft"
        )
    return LoraConfig(**kept)  # peft names the base model itself


# ------------------------------------------------------------------ accelerate
def accelerate_fsdp_on_cpu(accelerator) -> None:
    """accelerate sets up FSDP only on GPUs and other accelerators; on a CPU-only machine it
    quietly falls back to DDP over gloo. torch's FSDP2 (``fully_shard``) runs on the CPU over
    gloo, so switch the run to accelerate's FSDP with the plugin its launch config describes
    (FSDP2 needs accelerate >= 1.6)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if getattr(plugin, "fsdp_version", 1) != 2:
        import accelerate

        raise ValueError(
            "FSDP on a machine without a GPU needs FSDP2 (torch's fully_shard, which runs over gloo): set "
            "`fsdp_version: 2` under `fsdp_config` in the accelerate config (see recipes/accelerate/fsdp.yaml), "
            f"with accelerate >= 1.6 (this is {accelerate.__version__})."
        )
    from accelerate.state import PartialState

    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it back from there
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
