"""Distributed training, answered: ZeRO stages 1-3, the pipeline schedules and executor, and
ZeRO's memory and communication model."""

from . import pipeline as pipeline
from .zero import ZeroAdamW as ZeroAdamW
