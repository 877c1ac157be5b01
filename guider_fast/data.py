"""The old path of ``guider_fast.train.data``: importing it gives that same module."""
import sys

from .train import data

sys.modules[__name__] = data
