"""The old path of ``guider_fast.train.models``: importing it gives that same module."""
import sys

from .train import models

sys.modules[__name__] = models
