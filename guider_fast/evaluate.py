"""The old path of ``guider_fast.train.evaluate``: importing it gives that same module."""
import sys

from .train import evaluate

sys.modules[__name__] = evaluate
