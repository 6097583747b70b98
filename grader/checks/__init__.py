"""What every lab's checks share beyond ``course_runtime.testing``: speed graded as a ratio, and
blocked shortcuts.

The checks (one module per lab, named by the lab's key) are what the hidden tests call; they
compare a student's objects with ``course_reference`` and with PyTorch, and ship only inside
autograder zips.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from course_runtime.sandbox import Blocks
from course_runtime.sandbox import ForbiddenCall as ForbiddenCall  # one class on both sides


def check_ratio(yours: list[float], peer: list[float], *, what: str, peer_name: str,
                bound: float, unit: str = "step", advice: str = "",
                fastest: bool = False) -> float:
    """Grade speed as a ratio: the median of ``yours`` over the median of ``peer`` (seconds,
    measured interleaved in one process), or with ``fastest`` the fastest of each (for calls of
    a few milliseconds, which one preemption on a loaded machine doubles). Prints both times;
    fails above ``bound``."""
    pick, how = (min, "fastest") if fastest else (np.median, "median")
    ours_s, peer_s = float(pick(yours)), float(pick(peer))
    ratio = ours_s / peer_s
    print(f"{what}: yours {ours_s * 1e3:.2f} ms, {peer_name} {peer_s * 1e3:.2f} ms, "
          f"ratio {ratio:.2f}")
    if ratio > bound:
        raise AssertionError(
            f"your {what} takes {ratio:.2f}x the time of {peer_name} ({how} of {len(yours)} "
            f"interleaved {unit}s; the bound is {bound:g}x)" + (f": {advice}" if advice else ""))
    return ratio


@contextlib.contextmanager
def counted_forwards(**models: Any) -> Iterator[dict[str, list[int]]]:
    """Record every forward pass of each model (a ``torch.nn.Module``) in the block: per model,
    the batch size of each call's first argument (0 when it has no shape). A count a submission
    reports about its model calls is checked against these, never taken on trust.

    The hook sits on a GPT's token embedding, which each of its forward passes runs once, so a
    call of ``model.forward(...)`` is counted as well as ``model(...)``; on a model that lives in
    the submission's process it calls back here, so the count is kept out of that process."""
    calls: dict[str, list[int]] = {name: [] for name in models}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            shape = getattr(args[0], "shape", None) if args else None
            calls[name].append(int(shape[0]) if shape else 0)
        return hook

    hooks = [getattr(model, "embed", model).register_forward_pre_hook(recorder(name))
             for name, model in models.items()]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def on_one_cpu(obj: Any) -> Any:
    """While timing: every thread of the submission's process on one CPU, when ``obj`` lives in
    one (a process may start threads a thread setting does not reach); else nothing to do."""
    from grader.isolated import Proxy

    return obj._student.on_one_cpu() if isinstance(obj, Proxy) else contextlib.nullcontext()


def make_there(namespace: Any, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` (a function of ``course_runtime``) called where the
    submission's code runs: in its process when ``namespace`` is one (the result stays there,
    a proxy here), here otherwise. For what the submission's code is handed (a model, a cache)."""
    from grader.isolated import is_remote, student_of

    if is_remote(namespace):
        path = f"{function.__module__}:{function.__qualname__}"
        return student_of(namespace).public(path, *args, **kwargs)
    return function(*args, **kwargs)


def run_there(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``function`` (a function of ``course_runtime``, public code) where the submission's
    objects among the arguments live: in the student's process when they are proxies (a loop of
    a hundred thousand calls there is one request here), here otherwise."""
    from grader.isolated import Proxy

    def proxies(value: Any, depth: int = 0) -> Iterator[Proxy]:
        if isinstance(value, Proxy):
            yield value
        elif depth < 3 and isinstance(value, (list, tuple, dict)):
            for item in (value.values() if isinstance(value, dict) else value):
                yield from proxies(item, depth + 1)

    for value in (*args, *kwargs.values()):
        for proxy in proxies(value):
            path = f"{function.__module__}:{function.__qualname__}"
            return proxy._student.public(path, *args, **kwargs)
    return function(*args, **kwargs)


@contextlib.contextmanager
def forbid(paths: list[str], reason: str,
           namespace: dict[str, Any] | None = None) -> Iterator[None]:
    """Make each dotted ``path`` (a function or method) raise ``ForbiddenCall`` in the block.

    Names in ``namespace`` (a notebook's globals) bound to one of those functions, as after
    ``from torch.autograd import grad``, are blocked too. When ``namespace`` is a submission's
    process (``grader.isolated``), the functions are blocked there, where its code runs, with
    torch's autograd engine itself, so that a reference to it kept anywhere is blocked too.
    """
    from grader.isolated import is_remote, student_of

    if is_remote(namespace):
        # The reference and the grader cannot be imported there at all: nothing to block.
        there = [path for path in paths if not path.startswith(("course_reference.", "grader."))]
        if not there:
            yield
            return
        with student_of(namespace).blocked(there, reason):
            yield
        return
    blocks = Blocks({} if namespace is None else namespace, strict=True, engine=False)
    try:
        blocks.install(paths, reason)
        yield
    finally:
        blocks.remove()
