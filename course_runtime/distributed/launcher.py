"""Run ``fn(rank, world_size, *args)`` on N processes, from a script, a test or a notebook cell.

Every run gets a free port, a process-group timeout (a collective that a peer never joins fails
instead of waiting forever) and a wall-clock timeout on the whole run. The first rank to fail
stops every other rank, and its traceback is re-raised in the caller; a run that times out names
each rank that had not finished and the collective or send/recv it was waiting in.

Processes are forked (Linux), so functions defined in a notebook cell work. Where fork is not
available (macOS's default, Windows), define ``fn`` in a module and pass ``start_method="spawn"``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

SLOT_BYTES = 200  # per rank: what the rank is doing, for the timeout message


class WorkerError(RuntimeError):
    """A rank raised; the message holds that rank's traceback."""

    def __init__(self, rank: int, error_type: str, remote_traceback: str, where: str = ""):
        self.rank, self.error_type, self.remote_traceback = rank, error_type, remote_traceback
        context = f" while {where}" if where.startswith("waiting") else ""
        super().__init__(f"rank {rank} failed with {error_type}{context}:\n{remote_traceback}")


class LaunchTimeout(TimeoutError):
    """The run outlasted its time limit, typically a deadlock; the message says who waited where."""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    """NCCL when there is a GPU for every rank, gloo (CPU) otherwise."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


# -- what each rank is doing, in shared memory (so a hung run can be described) -----------------

_status: Any = None
_rank: int | None = None


def set_status(text: str) -> None:
    """Record what this rank is doing (called around every counted collective)."""
    if _status is not None and _rank is not None:
        data = text.encode()[: SLOT_BYTES - 1]
        start = _rank * SLOT_BYTES
        _status[start:start + len(data) + 1] = data + b"\0"


@contextlib.contextmanager
def status(text: str) -> Iterator[None]:
    """Mark the rank as waiting in ``text``; on an exception the mark stays, for the report."""
    set_status(f"waiting in {text}")
    yield
    set_status("running")


def _read_status(shared: Any, rank: int) -> str:
    raw = bytes(shared[rank * SLOT_BYTES:(rank + 1) * SLOT_BYTES])
    return raw.split(b"\0", 1)[0].decode(errors="replace") or "starting"


# -- the worker ---------------------------------------------------------------------------------

def _worker(rank: int, world_size: int, port: int, backend: str, group_timeout: float,
            threads: int, shared: Any, results: Any, fn: Callable[..., Any], args: tuple,
            kwargs: dict) -> None:
    global _status, _rank
    _status, _rank = shared, rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        set_status("joining the process group")
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=dt.timedelta(seconds=group_timeout))
        set_status("running")
        value = fn(rank, world_size, *args, **kwargs)
        set_status("finished")
        results.put(("ok", rank, pickle.dumps(value)))
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent
        where = _read_status(shared, rank)
        set_status(f"failed with {type(error).__name__}")
        results.put(("error", rank, type(error).__name__, traceback.format_exc(), where))
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None,
           timeout: float = 120.0, group_timeout: float | None = None,
           start_method: str = "fork", threads: int | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes.

    Returns the ranks' return values, in rank order. Raises ``WorkerError`` with the first failing
    rank's traceback, or ``LaunchTimeout`` after ``timeout`` seconds. ``group_timeout`` (default:
    the smaller of ``timeout`` and 60 s) bounds each collective.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    backend = backend or default_backend(world_size)
    if backend == "nccl" and start_method == "fork" and torch.cuda.is_initialized():
        raise RuntimeError("CUDA is already initialised in this process, and forked ranks "
                           "cannot use it: restart the kernel and call launch() before any "
                           "CUDA work, or use start_method='spawn' with fn defined in a module")
    if start_method not in mp.get_all_start_methods():
        raise RuntimeError(f"start method {start_method!r} is not available here; define fn in a "
                           "module and use start_method='spawn'")
    group_timeout = group_timeout or min(timeout, 60.0)
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    once = (fn, world_size, args, kwargs, backend, timeout, group_timeout, start_method, threads)
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return _launch_once(*once)
        except WorkerError as error:
            if not _port_taken(error):
                raise
    return _launch_once(*once)


# The port the ranks meet at is chosen free, then bound by rank 0 a moment later: another
# process (a parallel launch) can take it in between. Rank 0 then fails before any rank has
# run ``fn``, and the launch is tried again on another port.
PORT_ATTEMPTS = 3


def _port_taken(error: WorkerError) -> bool:
    text = error.remote_traceback
    return ("init_process_group" in text
            and ("EADDRINUSE" in text or "address already in use" in text.lower()))


def _launch_once(fn: Callable[..., Any], world_size: int, args: tuple, kwargs: dict,
                 backend: str, timeout: float, group_timeout: float, start_method: str,
                 threads: int) -> list[Any]:
    context = mp.get_context(start_method)
    shared = context.Array(ctypes.c_char, SLOT_BYTES * world_size, lock=False)
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, daemon=True, name=f"rank-{rank}",
                        args=(rank, world_size, port, backend, group_timeout, threads, shared,
                              results, fn, args, kwargs))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    finished = False
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waiting = [f"rank {r}: {_read_status(shared, r)}" for r in range(world_size)
                           if r not in values]
                raise LaunchTimeout(
                    f"the run did not finish within {timeout:g} s (a deadlock: a collective or "
                    f"recv that some rank never matches?); " + "; ".join(waiting))
            try:
                message = results.get(timeout=min(remaining, 0.5))
            except Exception:  # queue.Empty: check for ranks that died without a word
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    rank = processes.index(dead[0])
                    raise WorkerError(rank, "a crash", f"rank {rank} exited with code "
                                      f"{dead[0].exitcode} ({_read_status(shared, rank)})") \
                        from None
                continue
            if message[0] == "error":
                raise _root_cause([message] + _more_errors(results, processes, ERROR_GRACE_S))
            _, rank, payload = message
            values[rank] = pickle.loads(payload)
        finished = True
    finally:
        _stop(processes, grace=5.0 if finished else 0.0)
    return [values[rank] for rank in range(world_size)]


# When one rank fails, its peers usually fail a moment later because its connections closed; the
# first message to arrive is not always the cause. These markers name such knock-on failures.
KNOCK_ON = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
            "Broken pipe")
ERROR_GRACE_S = 3.0


def _more_errors(results: Any, processes: list[Any], grace: float) -> list[tuple[Any, ...]]:
    """The other ranks' error messages that arrive within ``grace`` seconds of the first."""
    found: list[tuple[Any, ...]] = []
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            message = results.get(timeout=0.1)
        except Exception:  # queue.Empty
            if not any(p.is_alive() for p in processes):
                break
            continue
        if message[0] == "error":
            found.append(message)
    return found


def _root_cause(errors: list[tuple[Any, ...]]) -> WorkerError:
    """The error that explains the run: the first one that is not a peer's connection closing
    (a timeout or the student's own exception), with the other ranks' failures summarised."""
    primary = next((e for e in errors if not any(m in e[3] for m in KNOCK_ON)), errors[0])
    _, rank, error_type, text, where = primary
    others = [f"rank {e[1]}: {e[2]}" + (" (its peer had gone)" if any(m in e[3] for m in KNOCK_ON)
                                        else "")
              for e in errors if e is not primary]
    if others:
        text = text.rstrip("\n") + "\nOther ranks failed too: " + "; ".join(others) + "\n"
    return WorkerError(rank, error_type, text, where)


def _stop(processes: list[Any], grace: float) -> None:
    """Let finished ranks exit within ``grace`` seconds; terminate, then kill, the rest."""
    end = time.monotonic() + grace
    for process in processes:
        process.join(timeout=max(0.0, end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=2.0)
        if process.is_alive():
            process.kill()
            process.join()
