"""The process that runs a student's notebook while it is graded, and answers the grader.

    python -m course_runtime.sandbox REQUESTS_FD REPLIES_FD INTERRUPTS_FD [--hide PATH ...]
                                     [--chmod PATH ...] [--user UID]

The grader (``grader.isolated``) starts this process and never runs a student's code itself;
this process never holds a hidden test, a check or the reference. It runs the notebook's cells
when told to, and answers requests about the objects they defined: read an attribute, call a
function, apply an operator. Results cross as values when they are plain data and as numbered
handles otherwise (``course_runtime.wire``); functions of the grader's arrive as callbacks, which
this process can call but not look into.

Started as root, it first hides what a submission must not read — each ``--hide`` path under an
empty file system in a mount namespace of its own (or, where the machine allows no namespaces,
each ``--chmod`` path made readable by root alone) — and then becomes an unprivileged user, so
that what was hidden cannot be uncovered. Without root it can only refuse the imports.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import importlib
import importlib.abc
import inspect
import io
import operator
import os
import signal
import sys
import traceback
from typing import Any

from . import wire

HIDDEN_PACKAGES = ("course_reference", "grader")
ITEMS_LIMIT = 1_000_000  # elements of an iteration sent as one list
CELL_LIMIT = float(os.environ.get("COURSE_CELL_TIMEOUT", "300"))

BINARY = {name: getattr(operator, name) for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
    "lshift", "rshift", "lt", "le", "gt", "ge", "eq", "ne", "contains")}
UNARY = {name: getattr(operator, name) for name in ("neg", "pos", "abs", "invert", "index")}
UNARY.update({"float": float, "int": int, "len": len, "repr": repr, "str": str, "bool": bool})


class ForbiddenCall(Exception):
    """A student's code called the library it was asked to re-implement."""


class CallbackError(Exception):
    """A function of the grader's, called by a student's code, failed."""


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuse to import what a submission must not use while it is graded."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in HIDDEN_PACKAGES:
            raise ImportError(f"{name} is not available to a submission while it is graded: "
                              "your notebook must not import the course's answers or its grader")
        return None


# --------------------------------------------------------------------------------------------
# Hiding files, dropping privileges
# --------------------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
PR_SET_DUMPABLE = 4
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 0x1000, 0x4000, 1 << 18


def _needed() -> list[str]:
    """What this process must still read as an unprivileged user: the interpreter, its
    libraries, the runtime and the working directory."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.getcwd(),
             os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(os.path.realpath(p) for p in paths)


def _closed_ancestors(paths: list[str]) -> dict[str, list[str]]:
    """The topmost directory above each path that others may not traverse (``/root`` where
    the interpreter was installed for root), with the paths under it."""
    closed: dict[str, list[str]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:
                closed.setdefault(ancestor, []).append(path)
                break
    return closed


def _mount_namespace(hide: list[str]) -> bool:
    """An empty read-only file system over each path to hide, seen by this process alone; a
    directory closed to others that holds what this process needs (``/root``) replaced by one
    that holds only that."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False

    def mount(source: str, target: str, kind: str | None, flags: int, data: str | None) -> None:
        if libc.mount(source.encode(), target.encode(), kind and kind.encode(), flags,
                      data and data.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"could not mount over {target}")

    for top, inside in _closed_ancestors(_needed()).items():
        original = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for path in inside:
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{original}/{os.path.relpath(path, top)}", path, None,
                  MS_BIND | MS_REC, None)
        os.close(original)
    for path in hide:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
        elif os.path.isfile(path):
            mount("/dev/null", path, None, MS_BIND, None)
    return True


def isolate(hide: list[str], chmod: list[str], user: int | None) -> str:
    """Hide ``hide`` (or, failing a namespace, restrict ``chmod``), then become ``user``.

    Returns how the process is isolated, in words, for the grading log."""
    how = []
    if os.geteuid() == 0 and user is not None:
        if hide and _mount_namespace(hide):
            how.append(f"{len(hide)} paths hidden in a mount namespace")
        else:
            for path in chmod:
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, 0o700)
            for top in _closed_ancestors(_needed()):
                os.chmod(top, os.stat(top).st_mode | 0o001)  # traversable, not listable
            how.append(f"{len(chmod)} paths readable by root alone")
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)
        # Not dumpable: another submission's process, graded as the same user in a batch,
        # cannot trace this one or read its memory through /proc.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        how.append(f"running as uid {user}")
    else:
        how.append("not root: files not hidden, imports refused")
    sys.meta_path.insert(0, _Refuse())
    for name in list(sys.modules):
        if name.split(".")[0] in HIDDEN_PACKAGES:
            del sys.modules[name]
    return "; ".join(how)


# --------------------------------------------------------------------------------------------
# Blocking a library while the grader calls a submission
# --------------------------------------------------------------------------------------------

class _Engine:
    """Stands in for torch's autograd engine: every way into it (a saved reference to
    ``torch.autograd.grad`` as much as ``Tensor.backward``) ends here while it is blocked."""

    def __init__(self, original: Any, message: str):
        self._original, self._message = original, message

    def __getattr__(self, name: str) -> Any:
        if name in ("run_backward", "queue_callback"):
            def blocked(*args: Any, **kwargs: Any) -> Any:
                raise ForbiddenCall(self._message)
            return blocked
        return getattr(self._original, name)


def _resolve(path: str) -> tuple[Any, str]:
    module_name, _, attribute = path.rpartition(".")
    try:
        return importlib.import_module(module_name), attribute
    except ImportError:
        owner_path, _, owner_attr = module_name.rpartition(".")
        return getattr(importlib.import_module(owner_path), owner_attr), attribute


_MISSING = object()


def blocker(label: str, reason: str) -> Any:
    """A function that raises ``ForbiddenCall`` for ``label`` (a dotted path), saying why."""
    def blocked(*args: Any, **kwargs: Any) -> Any:
        raise ForbiddenCall(f"your code called {label}: {reason}")
    return blocked


NOTEBOOK: dict[str, Any] = {}  # in a submission's process: the notebook's names (``blocking``)


@contextlib.contextmanager
def blocking(paths: list[str], reason: str) -> Any:
    """``Blocks`` of ``paths`` for the block, the notebook's names bound to them included when
    it runs in a submission's process: how code of ``course_runtime`` that calls a submission
    there (a rank of a launch) blocks what a check forbids, call by call."""
    blocks = Blocks(NOTEBOOK)
    blocks.install(list(paths), reason)
    try:
        yield
    finally:
        blocks.remove()


class Blocks:
    """Functions (dotted paths) made to raise ``ForbiddenCall`` until ``remove``, with the names
    in ``namespace`` (a notebook's globals) bound to them. ``strict``: a path that does not
    resolve is an error (in the grader's process every path must), rather than nothing to block
    (the reference, which a submission's process cannot import). ``engine``: with a path into
    torch's autograd, its engine is blocked too, which catches a reference to it kept anywhere;
    only where the grader runs none of its own autograd meanwhile (a submission's process)."""

    def __init__(self, namespace: dict[str, Any], *, strict: bool = False, engine: bool = True):
        self.namespace, self.strict, self.engine = namespace, strict, engine
        self.saved: list[tuple[Any, str, Any]] = []

    def install(self, paths: list[str], reason: str) -> None:
        for path in paths:
            try:
                owner, attribute = _resolve(path)
                original = getattr(owner, attribute)
            except (ImportError, AttributeError):
                if self.strict:
                    raise
                continue  # not importable here (the reference): nothing to block
            self.saved.append((owner, attribute, vars(owner).get(attribute, _MISSING)))
            setattr(owner, attribute, blocker(path, reason))
            for name, value in list(self.namespace.items()):
                if value is original:
                    self.saved.append((self.namespace, name, value))
                    self.namespace[name] = blocker(path, reason)
            if self.engine and (path.startswith("torch.autograd")
                                or path == "torch.Tensor.backward"):
                from torch.autograd.variable import Variable
                engine = Variable._execution_engine
                if not isinstance(engine, _Engine):
                    self.saved.append((Variable, "_execution_engine", engine))
                    Variable._execution_engine = _Engine(
                        engine, f"your code ran torch's autograd engine: {reason}")

    def remove(self) -> None:
        for owner, attribute, original in reversed(self.saved):
            if isinstance(owner, dict):
                owner[attribute] = original
            elif original is _MISSING:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self.saved.clear()


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class _Callback:
    """A function of the grader's: calling it asks the grader to run it."""

    __slots__ = ("_server", "_number")

    def __init__(self, server: Server, number: int):
        self._server, self._number = server, number

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._server.call_back(self._number, args, kwargs)

    def __repr__(self) -> str:
        return f"<a function of the grader's #{self._number}>"


class _Exposed:
    """An object of the grader's (a model, a KV cache, an allocator) handed to a submission's
    code: the members the grader lists, each read or call a request to the grader; nothing
    else of it is here. Handed back to the grader, it arrives there as the object itself."""

    __slots__ = ("_server", "_number", "_type", "_methods", "_attributes")

    def __init__(self, server: Server, number: int, type_name: str, methods: dict[str, int],
                 attributes: dict[str, int]):
        for name, value in (("_server", server), ("_number", number), ("_type", type_name),
                            ("_methods", methods), ("_attributes", attributes)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name in self._methods:
            return _Callback(self._server, self._methods[name])
        if name in self._attributes:
            return self._server.call_back(self._attributes[name], (), {})
        offered = ", ".join(sorted({*self._methods, *self._attributes} - {"__call__"}))
        raise AttributeError(f"the grader's {self._type} has no {name!r} for your code to use "
                             f"(it offers {offered})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the grader's {self._type} is read-only: {name!r} cannot be set")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "__call__" not in self._methods:
            raise TypeError(f"the grader's {self._type} cannot be called")
        return self._server.call_back(self._methods["__call__"], args, kwargs)

    def __dir__(self) -> list[str]:
        return sorted({*self._methods, *self._attributes})

    def __repr__(self) -> str:
        return f"<the grader's {self._type}>"


def _numbers(value: Any) -> dict[str, int]:
    if type(value) is not dict or not all(type(k) is str and type(v) is int
                                          for k, v in value.items()):
        raise wire.WireError("an exposed object whose members are not numbered")
    return value


class OtterStandIn:
    """Stands in for ``otter.Notebook`` in the notebook: the grader checks questions itself."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def check(self, *args: Any, **kwargs: Any) -> None:
        pass

    def check_all(self, *args: Any, **kwargs: Any) -> None:
        pass

    def export(self, *args: Any, **kwargs: Any) -> None:
        pass


class Server:
    def __init__(self, requests: int, replies: int, interrupts: int):
        self.requests, self.replies, self.interrupts = requests, replies, interrupts
        self.reader = wire.Reader(requests)
        self.handles: dict[int, Any] = {}
        self.numbers: dict[int, int] = {}  # id(object) -> handle
        self.next_handle = 1
        self.exposed: dict[int, _Exposed] = {}
        self.current = 0  # the request being served, for interrupts
        self.shell = self._shell()
        self.blocks = Blocks(self.shell.user_ns)
        from course_runtime import sandbox as public  # this file runs as __main__

        public.NOTEBOOK = self.shell.user_ns
        self.pinned: contextlib.ExitStack | None = None

    @staticmethod
    def _shell() -> Any:
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.enabled = False
        config.InteractiveShell.colors = "nocolor"
        config.InteractiveShell.xmode = "Plain"
        shell = InteractiveShell.instance(config=config)
        shell.user_ns["grader"] = OtterStandIn()
        return shell

    # handles ---------------------------------------------------------------------------------

    def reference(self, obj: Any) -> dict[str, Any]:
        if type(obj) is _Exposed:
            return {"$x": obj._number}
        number = self.numbers.get(id(obj))
        if number is None or self.handles.get(number) is not obj:
            number = self.next_handle
            self.next_handle += 1
            self.handles[number] = obj
            self.numbers[id(obj)] = number
        return {"$h": number, "type": type(obj).__name__}

    def resolve(self, ref: dict[str, Any]) -> Any:
        if "$h" in ref:
            try:
                return self.handles[ref["$h"]]
            except KeyError:
                raise wire.WireError("a handle that was released") from None
        if "$c" in ref:
            return _Callback(self, int(ref["$c"]))
        if "$x" in ref and type(ref["$x"]) is int:
            number = ref["$x"]
            if number not in self.exposed:
                self.exposed[number] = _Exposed(self, number, str(ref.get("type", "object"))[:60],
                                                _numbers(ref.get("m", {})),
                                                _numbers(ref.get("a", {})))
            return self.exposed[number]
        raise wire.WireError(f"an unknown reference {sorted(ref)}")

    def release(self, numbers: list[int]) -> None:
        for number in numbers:
            obj = self.handles.pop(number, None)
            if obj is not None and self.numbers.get(id(obj)) == number:
                del self.numbers[id(obj)]

    # messages --------------------------------------------------------------------------------

    def send(self, kind: str, **fields: Any) -> None:
        data, buffers = wire.encode(fields.pop("value", None), self.reference)
        wire.send(self.replies, {"kind": kind, "value": data, **fields}, buffers)

    def send_error(self, error: BaseException, seq: int) -> None:
        kind = "Interrupted" if isinstance(error, KeyboardInterrupt) else type(error).__name__
        try:
            message = str(error)
        except Exception:  # noqa: BLE001 - a submission's exception may fail to print itself
            message = "(the exception could not be shown)"
        mro = [c.__name__ for c in type(error).__mro__]
        public = wire.exception_fields(error)
        extra = {"public": public[0], "fields": public[1]} if public else {}
        try:
            self.send("error", seq=seq, type=kind, mro=mro, message=message[:4000],
                      value=self.reference(error), **extra)
        except Exception:  # noqa: BLE001
            wire.send(self.replies, {"kind": "error", "seq": seq, "type": kind, "mro": mro,
                                     "message": message[:4000], "value": None}, [])

    def call_back(self, number: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        data, buffers = wire.encode({"args": list(args), "kwargs": kwargs}, self.reference)
        wire.send(self.replies, {"kind": "callback", "number": number, "value": data}, buffers)
        while True:
            message, buffers = self._receive()
            if message.get("kind") == "return":
                return wire.decode(message["value"], buffers, self.resolve)
            if message.get("kind") == "raise":
                if "public" in message:  # an OutOfBlocks of the grader's allocator, as itself
                    raise wire.public_exception(message["public"], message.get("fields"))
                raise CallbackError(message.get("message", "the grader's function failed"))
            self.serve_one(message, buffers)

    def _receive(self) -> tuple[dict[str, Any], list[bytes]]:
        return self.reader.frame()

    def loop(self) -> None:
        while True:
            try:
                message, buffers = self._receive()
            except EOFError:
                return
            if message.get("kind") == "stop":
                return
            self.serve_one(message, buffers)

    def serve_one(self, message: dict[str, Any], buffers: list[bytes]) -> None:
        self.release(message.get("release", []))
        seq = message.get("seq", 0)
        seq = seq if type(seq) is int else 0
        outer, self.current = self.current, seq
        try:
            value = self.answer(message, buffers)
        except BaseException as error:  # noqa: BLE001 - everything a submission raises is news
            self.current = outer
            self.send_error(error, seq)
            return
        self.current = outer
        try:
            if isinstance(value, _AsHandle):
                wire.send(self.replies, {"kind": "reply", "seq": seq,
                                         "value": self.reference(value.obj)}, [])
            else:
                self.send("reply", seq=seq, value=value)
        except (wire.Unsendable, ValueError, OverflowError, TypeError) as error:
            self.send_error(error, seq)

    def on_interrupt(self, signum: int, frame: Any) -> None:
        """SIGINT from the grader: interrupt the request it names, if it is still running."""
        try:
            wanted = int.from_bytes(os.read(self.interrupts, 8), "little")
        except (BlockingIOError, OSError):
            return
        if wanted == self.current and wanted:
            raise KeyboardInterrupt("interrupted by the grader")

    # requests --------------------------------------------------------------------------------

    def answer(self, message: dict[str, Any], buffers: list[bytes]) -> Any:
        op = message.get("op")
        args = wire.decode(message.get("value"), buffers, self.resolve)
        if op == "cell":
            return self.run_cell(args["source"], float(args.get("limit", CELL_LIMIT)))
        if op == "global":
            namespace = self.shell.user_ns
            return {"found": args in namespace, "value": namespace.get(args)}
        target = args.get("target") if isinstance(args, dict) else None
        if op == "getattr":
            return getattr(target, args["name"])
        if op == "setattr":
            setattr(target, args["name"], args["value"])
            return None
        if op == "hasattr":
            return hasattr(target, args["name"])
        if op == "call":
            return target(*args["args"], **args["kwargs"])
        if op == "binary":
            function = BINARY[args["name"]]
            return (function(args["other"], target) if args.get("reflected")
                    else function(target, args["other"]))
        if op == "unary":
            return UNARY[args["name"]](target)
        if op == "getitem":
            return target[args["key"]]
        if op == "setitem":
            target[args["key"]] = args["value"]
            return None
        if op == "list":
            items = []
            for item in target:
                items.append(item)
                if len(items) > ITEMS_LIMIT:
                    raise ValueError(f"more than {ITEMS_LIMIT} items")
            return items
        if op == "array":
            import numpy as np
            return np.asarray(target)
        if op == "keep":  # a value the grader sends once, to be used here many times
            return _AsHandle(args["value"])
        if op == "isinstance":
            module = importlib.import_module(args["module"])
            return isinstance(target, getattr(module, args["name"]))
        if op == "callable":
            return callable(target)
        if op == "block":
            self.blocks.install(list(args["paths"]), str(args["reason"]))
            return None
        if op == "unblock":
            self.blocks.remove()
            return None
        if op == "threads":  # BLAS/OpenMP and torch threads, as while the grader times
            if self.pinned is not None:
                self.pinned.close()
                self.pinned = None
            if args.get("count"):
                from course_runtime.timing import pinned_threads
                self.pinned = contextlib.ExitStack()
                self.pinned.enter_context(pinned_threads(int(args["count"])))
            return None
        if op == "test":  # one of the lab's public test cases, run as the notebook runs it
            return self.run_public_test(str(args["source"]))
        if op == "public":
            module_name, _, name = args["function"].partition(":")
            if module_name.split(".")[0] != "course_runtime":
                raise ValueError(f"{module_name} is not part of course_runtime")
            function = importlib.import_module(module_name)
            for part in name.split("."):  # a function, or a class's method (``Class.method``)
                function = getattr(function, part)
            return function(*args["args"], **args["kwargs"])
        raise wire.WireError(f"an unknown request {op!r}")

    def run_public_test(self, source: str) -> None:
        """A public test case (a function, its otter decorator removed) called on the notebook's
        names as ``grader.check`` calls it; what it raises is the test's failure message."""
        tree = ast.parse(source)
        function = tree.body[0] if len(tree.body) == 1 else None
        if not isinstance(function, ast.FunctionDef):
            raise wire.WireError("a test case that is not one function")
        function.decorator_list = []
        scope: dict[str, Any] = {"__name__": "public_test"}
        exec(compile(ast.Module([function], []), f"<public test {function.name}>", "exec"), scope)
        test = scope[function.name]
        names = self.shell.user_ns
        test(**{name: names if name == "env" else names.get(name)
                for name in inspect.signature(test).parameters})

    def run_cell(self, source: str, limit: float) -> dict[str, Any]:
        """One notebook cell, as a kernel runs it: its exception (or a time limit) reported,
        execution going on with the next cell when the grader asks for it."""
        def on_alarm(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"the cell ran past the grader's limit of {limit:g} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                result = self.shell.run_cell(source, store_history=False, silent=True)
            error = result.error_in_exec or result.error_before_exec
        except KeyboardInterrupt as interrupt:
            error = interrupt
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sys.stdout.write(out.getvalue()[-20000:])
        sys.stdout.flush()
        if error is None:
            return {"ok": True}
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        return {"ok": False, "error": type(error).__name__, "message": text[-2000:],
                "interrupted": isinstance(error, KeyboardInterrupt)}


class _AsHandle:
    """A reply to send as a handle even where it is plain data."""

    def __init__(self, obj: Any):
        self.obj = obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("requests", type=int)
    parser.add_argument("replies", type=int)
    parser.add_argument("interrupts", type=int)
    parser.add_argument("--hide", action="append", default=[])
    parser.add_argument("--chmod", action="append", default=[])
    parser.add_argument("--user", type=int, default=None)
    args = parser.parse_args(argv)
    how = isolate(args.hide, args.chmod, args.user)
    print(f"[sandbox] {how}", flush=True)
    os.set_blocking(args.interrupts, False)
    server = Server(args.requests, args.replies, args.interrupts)
    signal.signal(signal.SIGINT, server.on_interrupt)
    server.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
