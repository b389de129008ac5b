"""Values every layer of hmt shares; this module imports nothing (the bottom floor)."""

IGNORE_INDEX = -100  # a label that is not scored (the Hugging Face convention)
DEFAULT_ADAPTER = "smollm2-135m"  # the adapter shipped for the default backbone (``hmt/adapters/``)
