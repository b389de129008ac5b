"""``hmt.train``: the trainer's names where they have always been (``hmt.train.train``,
``hmt.train.TrainConfig``, ``hmt.train.load_recipe``, ...): every name of :mod:`hmt.training`,
the package the trainer now is."""

from .training import *  # noqa: F401,F403  (the names of hmt.training.__all__)
from .training import __all__  # noqa: F401
