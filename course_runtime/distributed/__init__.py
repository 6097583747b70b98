"""Distributed code on a laptop: one launcher (forked ranks, gloo or NCCL, timeouts) and
collectives that count their bytes and calls per rank."""

from . import comm as comm
from .launcher import LaunchTimeout, WorkerError, free_port, launch

__all__ = ["LaunchTimeout", "WorkerError", "comm", "free_port", "launch"]
