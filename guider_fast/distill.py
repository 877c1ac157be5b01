"""The old path of ``guider_fast.train.distill``: importing it gives that same module."""
import sys

from .train import distill

sys.modules[__name__] = distill
