"""The one torch reference of every op: the CPU path and the oracle tests compare against."""

from . import calibration, dbpr, dbpr_step, samples_loss, sinkhorn

__all__ = ["calibration", "dbpr", "dbpr_step", "samples_loss", "sinkhorn"]
