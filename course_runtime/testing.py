"""What tests share: time limits, and comparisons whose failures explain themselves.

Public tests (in each lab's ``tests/`` folder) and the course's hidden checks call these rather
than asserting directly, so that every failure says what was expected, what came back and with
which shapes, and so that an infinite loop becomes a failed test instead of a hung notebook.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class GradingTimeout(Exception):
    """A student's code ran longer than the test allows (an infinite loop, or far too slow)."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``GradingTimeout`` in the block if it runs longer than ``seconds``.

    Uses SIGALRM, so it interrupts pure-Python loops; an earlier timer (an enclosing limit) is
    restored afterwards. Off the main thread, where signals cannot be delivered, it only times.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise GradingTimeout(f"{what} did not finish within {seconds:g} s: is there an infinite "
                             "loop, or is it far slower than it should be?")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            signal.setitimer(signal.ITIMER_REAL, previous_delay)


def require(**objects: Any) -> None:
    """Fail clearly when a name the test needs was never defined by the notebook."""
    missing = [name for name, value in objects.items() if value is None]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        raise AssertionError(f"{names} not defined: run the cell that defines it and check that "
                             "it raised no error (and that you kept the name the handout uses)")


def describe(array: Any) -> str:
    array = np.asarray(array)
    if array.size <= 6:
        return f"{np.array2string(array.ravel(), precision=5)} (shape {array.shape})"
    return f"array of shape {array.shape}, dtype {array.dtype}"


def assert_close(actual: Any, expected: np.ndarray, *, what: str, atol: Any,
                 rtol: float = 0.0) -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|``, with a message that names
    ``what``, the shapes, the worst element and its expected and actual values."""
    if actual is None:
        raise AssertionError(f"{what}: got None, expected {describe(expected)}")
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: expected shape {expected.shape}, got shape {actual.shape}")
    if not np.all(np.isfinite(actual)) and np.all(np.isfinite(expected)):
        bad = np.unravel_index(np.argmax(~np.isfinite(actual)), actual.shape)
        raise AssertionError(f"{what}: got a non-finite value {actual[bad]} at index {bad} "
                             f"(expected {expected[bad]:.6g}); an overflow?")
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    allowed = np.asarray(atol, dtype=np.float64) + rtol * np.abs(expected)
    over = error - allowed
    if over.size and np.max(over) > 0:
        worst = np.unravel_index(np.argmax(over), over.shape)
        raise AssertionError(
            f"{what}: mismatch at index {tuple(int(i) for i in worst)} of shape "
            f"{expected.shape}: expected {expected[worst]:.6g}, got {actual[worst]:.6g} "
            f"(error {error[worst]:.3g}, "
            f"allowed {np.broadcast_to(allowed, error.shape)[worst]:.3g})"
        )


def float_tolerance(exact: np.ndarray, *approximations: np.ndarray,
                    dtype: Any = np.float32, slack: float = 8.0) -> np.ndarray:
    """An elementwise tolerance derived from how far trusted float32 implementations (PyTorch,
    the reference) land from the float64 answer, times ``slack``, plus a few ulps of ``dtype``.
    """
    exact = np.asarray(exact, dtype=np.float64)
    spread = np.zeros_like(exact)
    for approximation in approximations:
        spread = np.maximum(spread, np.abs(np.asarray(approximation, np.float64) - exact))
    eps = np.finfo(dtype).eps
    scale = max(float(np.max(np.abs(exact))) if exact.size else 0.0, 1.0)
    return slack * spread + 16 * eps * (np.abs(exact) + scale)


EXPECTED_FILE = "expected.json"


def expected(key: str) -> Any:
    """The value ``key`` of the lab's ``expected.json``: what the course's reference computed for
    a public test's cases when the lab was assigned (it ships beside the notebook)."""
    import json
    from pathlib import Path

    path = Path(EXPECTED_FILE)
    if not path.exists():
        raise AssertionError(f"{EXPECTED_FILE} is missing from {Path.cwd()}: it ships with the "
                             "lab, beside the notebook; run the notebook from its own folder")
    data = json.loads(path.read_text())
    if key not in data:
        raise AssertionError(f"{EXPECTED_FILE} has no entry {key!r}: is it the file of this lab?")
    return data[key]


def views_of(unflatten: Callable[..., Any], flat: Any, shapes: Any) -> tuple[list[Any], list[bool]]:
    """``unflatten(flat, shapes)`` as a list, and for each tensor in it whether it is a view of
    ``flat`` (shares its memory; an empty tensor counts as one) rather than a copy."""
    import torch

    views = list(unflatten(flat, shapes))
    base = flat.untyped_storage().data_ptr()
    return views, [isinstance(v, torch.Tensor) and (
        not v.numel() or v.untyped_storage().data_ptr() == base) for v in views]


def same_attribute(a: Any, b: Any, name: str) -> bool:
    """Whether ``a`` and ``b`` hold one and the same object as ``name`` (two block tables
    sharing one list of blocks), asked where they live."""
    return getattr(a, name) is getattr(b, name)


def largest_new_tensor(fn: Callable[..., Any], *args: Any) -> tuple[Any, int, str]:
    """``fn(*args)``, with the number of elements of the largest tensor any torch operation
    in it produced with memory of its own, and that operation: a view of an input (``select``,
    ``transpose``, indexing by a number) copies nothing and is not counted. A structural check
    that some data was never gathered into one dense tensor."""
    import torch
    from torch.utils import _pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest, op = 0, ""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr()
                      for t in _pytree.tree_leaves((args, kwargs or {}))
                      if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.numel() > self.largest
                        and t.untyped_storage().data_ptr() not in inputs):
                    self.largest, self.op = t.numel(), str(func)
            return out

    recorder = Largest()
    with recorder:
        result = fn(*args)
    return result, recorder.largest, recorder.op
