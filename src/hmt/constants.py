"""Names and values every layer of hmt shares; this module imports nothing (the bottom floor)."""

IGNORE_INDEX = -100  # a label that is not scored (the Hugging Face convention)
DEFAULT_ADAPTER = "smollm2-135m"  # the adapter shipped for the default backbone (``hmt/adapters/``)
BACKBONE_PREFIX = "backbone."  # state_dict names of the backbone's tensors inside HMT


def is_own(name: str) -> bool:
    """Whether the parameter or buffer ``name`` (of an HMT's ``named_parameters``/``state_dict``) is
    HMT's own (T, initial memory, W_q, W_k, compression), not the backbone's."""
    return not name.startswith(BACKBONE_PREFIX)
