"""Grading with the checks out of the submission's reach.

The student's notebook runs in a process of its own (``course_runtime.sandbox``), started as an
unprivileged user where the grader is root, with the hidden tests, the checks and the reference
hidden from it. The hidden tests run here, in the grader's process, exactly as otter runs them,
except that the names they ask for (``Tensor``, ``backward``, ...) are :class:`Proxy` objects:
every attribute read, call or operator on one is a request to the student's process, whose
answer comes back as plain data (a fresh NumPy array, a number, a string) or as another proxy.
A value that arrives cannot steer a comparison made with it; a proxy never compares equal to
anything but itself. Every message a student sees is composed here.

:func:`grade_notebook` has the signature of ``otter.execute.grade_notebook`` and returns otter's
``GradingResults``, so otter's autograder (the zip, Gradescope, ``otter grade``) and the batch
grader keep their formats; ``grader.gradescope.install`` puts it in otter's place for the labs
whose checks say ``ISOLATED = True``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import importlib.util
import inspect
import os
import pickle
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from course_runtime import wire
from course_runtime.sandbox import CallbackError, ForbiddenCall
from course_runtime.testing import GradingTimeout

REQUEST_LIMIT = float(os.environ.get("COURSE_CELL_TIMEOUT", "300"))  # seconds, any one request
GRACE = 10.0  # seconds an interrupted request gets to stop before its process is killed
UNPRIVILEGED = "nobody"



def _current_cpu() -> int:
    """The CPU the calling thread runs on now (field 39 of its ``stat``), one it may run on if
    that cannot be read."""
    allowed = sorted(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat = Path("/proc/thread-self/stat").read_text()
        cpu = int(stat[stat.rindex(")") + 2:].split()[36])
        if cpu in allowed:
            return cpu
    return allowed[0]


@contextlib.contextmanager
def _timing_cpu() -> Iterator[int]:
    """A CPU for one timed block, leased so that two gradings on the machine (a batch's
    workers, a test suite's) do not time on the same one while another sits idle: the first
    CPU, from the one this thread runs on, whose lock file no other timed block holds; the
    current one when every CPU is taken. Load from anything else falls on both contenders of
    the block alike, as they share the CPU and take turns."""
    allowed = sorted(os.sched_getaffinity(0))
    here = _current_cpu()
    order = allowed[allowed.index(here):] + allowed[:allowed.index(here)]
    for cpu in order:
        try:
            handle = open(Path(tempfile.gettempdir()) / f"course-timing-cpu-{cpu}.lock", "a")  # noqa: SIM115
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        try:
            yield cpu
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    yield here


class StudentProcessGone(Exception):
    """The process that ran the notebook stopped (killed, crashed, or stopped answering)."""


class StudentException(Exception):
    """Mixed into every exception re-raised here from a submission's code."""

    remote: Any = None


_EXCEPTION_CLASSES: dict[tuple[str, type], type] = {}


def _exception_class(name: str, mro: list[str]) -> type:
    base: type = RuntimeError
    for candidate in mro:
        found = getattr(builtins, candidate, None)
        if isinstance(found, type) and issubclass(found, Exception):
            base = found
            break
    key = (name, base)
    if key not in _EXCEPTION_CLASSES:
        _EXCEPTION_CLASSES[key] = type(name, (base, StudentException), {"__module__": "student"})
    return _EXCEPTION_CLASSES[key]


# --------------------------------------------------------------------------------------------
# Proxies
# --------------------------------------------------------------------------------------------

class Proxy:
    """An object that lives in the student's process."""

    __slots__ = ("_student", "_handle", "_type", "__weakref__")
    __array_ufunc__ = None  # NumPy defers to the reflected operators below

    def __init__(self, student: StudentProcess, handle: int, type_name: str):
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_type", type_name)

    def _ask(self, op: str, **fields: Any) -> Any:
        return self._student.request(op, {"target": self, **fields})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._ask("setattr", name=name, value=value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ask("call", args=list(args), kwargs=kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self._ask("getitem", key=key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ask("setitem", key=key, value=value)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._ask("list"))

    def __len__(self) -> int:
        return self._ask("unary", name="len")

    def __float__(self) -> float:
        return float(self._ask("unary", name="float"))

    def __int__(self) -> int:
        return int(self._ask("unary", name="int"))

    def __index__(self) -> int:
        return operator_index(self._ask("unary", name="index"))

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        value = self._ask("array")
        return value if dtype is None else value.astype(dtype)

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:  # never the submission's say
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        try:
            text = self._ask("unary", name="repr")
        except Exception:  # noqa: BLE001 - a submission's repr may fail
            text = None
        return text[:300] if isinstance(text, str) else f"<your {self._type}>"

    __str__ = __repr__

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._student._release(self._handle)


def operator_index(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"__index__ returned {type(value).__name__}, not int")
    return value


def _binary(name: str, reflected: bool) -> Callable[[Proxy, Any], Any]:
    def method(self: Proxy, other: Any) -> Any:
        return self._ask("binary", name=name, other=other, reflected=reflected)
    return method


def _unary(name: str) -> Callable[[Proxy], Any]:
    def method(self: Proxy) -> Any:
        return self._ask("unary", name=name)
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift"):
    _op = _name + "_" if _name in ("and", "or") else _name
    setattr(Proxy, f"__{_name}__", _binary(_op, reflected=False))
    setattr(Proxy, f"__r{_name}__", _binary(_op, reflected=True))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(_name))


class RemoteNamespace:
    """The notebook's global names, as the hidden tests see them (otter's ``env``)."""

    def __init__(self, student: StudentProcess):
        self.student = student

    def get(self, name: str, default: Any = None) -> Any:
        answer = self.student.request("global", name)
        return answer["value"] if answer["found"] else default

    def __getitem__(self, name: str) -> Any:
        answer = self.student.request("global", name)
        if not answer["found"]:
            raise KeyError(name)
        return answer["value"]

    def __contains__(self, name: object) -> bool:
        return bool(self.student.request("global", name)["found"])


class Exposed:
    """An object of the grader's that a submission's code is handed (the reference's KV cache,
    its allocator, the model): in the submission's process it is a stand-in offering the listed
    ``methods`` (each call runs here, as a callback) and ``attributes`` (each read here, when it
    is read there); nothing else of the object is reachable from there. Given back to the
    grader (the cache passed to the model), it arrives as the object itself.

    ``methods`` and ``attributes`` map a member's name to what serves it: a method's function
    (``None``: the object's own method) and an attribute's getter (``None``: read the object's
    attribute; its value must be data that crosses, or another ``Exposed``)."""

    def __init__(self, obj: Any, *, methods: Any = (), attributes: Any = (),
                 name: str | None = None):
        self.obj, self.name = obj, name or type(obj).__name__
        methods = methods if isinstance(methods, dict) else dict.fromkeys(methods)
        attributes = attributes if isinstance(attributes, dict) else dict.fromkeys(attributes)
        self.methods = {m: f if f is not None else getattr(obj, m) for m, f in methods.items()}
        self.attributes = {a: g if g is not None else (lambda a=a: getattr(obj, a))
                           for a, g in attributes.items()}


def is_remote(*objects: Any) -> bool:
    return any(isinstance(o, (Proxy, RemoteNamespace)) for o in objects)


def student_of(*objects: Any) -> StudentProcess:
    for o in objects:
        if isinstance(o, Proxy):
            return o._student
        if isinstance(o, RemoteNamespace):
            return o.student
    raise ValueError("none of these objects lives in a student's process")


# --------------------------------------------------------------------------------------------
# The student's process
# --------------------------------------------------------------------------------------------

def _blocked_signals() -> Any:
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})


class StudentProcess:
    """``course_runtime.sandbox`` running in ``workdir``, and the channel to it."""

    def __init__(self, workdir: Path, *, hide: list[str] = (), user: int | None = None,
                 log: Any = None):
        self.workdir = Path(workdir)
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        self.reader = wire.Reader(self.from_child)
        interrupts_r, self.interrupts = os.pipe()
        command = [sys.executable, "-m", "course_runtime.sandbox", str(to_child_r),
                   str(from_child_w), str(interrupts_r)]
        for path in hide:
            command += ["--hide", path, "--chmod", path]
        if user is not None:
            command += ["--user", str(user)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_SECRET")}
        env.update(HOME=str(self.workdir), MPLCONFIGDIR=str(self.workdir / ".matplotlib"),
                   TMPDIR=str(self.workdir), PYTHONHASHSEED="0", MPLBACKEND="Agg",
                   PYTHONNOUSERSITE="1")
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=log if log is not None else None, stderr=subprocess.STDOUT,
            pass_fds=(to_child_r, from_child_w, interrupts_r), start_new_session=True)
        for fd in (to_child_r, from_child_w, interrupts_r):
            os.close(fd)
        self.seq = 0
        self.proxies: weakref.WeakValueDictionary[int, Proxy] = weakref.WeakValueDictionary()
        self.pending_release: set[int] = set()
        self.callbacks: dict[int, Callable[..., Any]] = {}
        self.kept: dict[str, Any] = {}  # what the checks built here to reuse (a model), by name
        self.exposed: dict[int, tuple[Exposed, dict[str, Any]]] = {}  # by id, kept alive
        self.exposed_numbers: dict[int, Exposed] = {}
        self.gone: str | None = None

    # references ------------------------------------------------------------------------------

    def _reference(self, x: Any) -> dict[str, Any]:
        if isinstance(x, Proxy):
            if x._student is not self:
                raise wire.Unsendable("an object of another submission's process")
            return {"$h": x._handle}
        if isinstance(x, Exposed):  # described once; its members become callbacks
            if id(x) not in self.exposed:
                number = len(self.exposed) + 1
                spec = {"$x": number, "type": x.name,
                        "m": {m: self._reference(f)["$c"] for m, f in x.methods.items()},
                        "a": {a: self._reference(g)["$c"] for a, g in x.attributes.items()}}
                self.exposed[id(x)] = (x, spec)
                self.exposed_numbers[number] = x
            return self.exposed[id(x)][1]
        if callable(x):  # kept for the life of the process: the student's code may keep it
            number = len(self.callbacks) + 1
            self.callbacks[number] = x
            return {"$c": number}
        raise wire.Unsendable(f"a {type(x).__name__} cannot be sent to the notebook's process")

    def _resolve(self, ref: dict[str, Any]) -> Any:
        if "$h" in ref:
            handle = ref["$h"]
            if type(handle) is not int:
                raise wire.WireError("a handle that is not a number")
            self.pending_release.discard(handle)
            proxy = self.proxies.get(handle)
            if proxy is None:
                proxy = Proxy(self, handle, str(ref.get("type", "object"))[:60])
                self.proxies[handle] = proxy
            return proxy
        if "$c" in ref and ref["$c"] in self.callbacks:
            return self.callbacks[ref["$c"]]
        if "$x" in ref and ref["$x"] in self.exposed_numbers:
            return self.exposed_numbers[ref["$x"]].obj
        raise wire.WireError("an unknown reference")

    def _release(self, handle: int) -> None:
        if self.gone is None:
            self.pending_release.add(handle)

    # requests --------------------------------------------------------------------------------

    def request(self, op: str, payload: Any = None, timeout: float = REQUEST_LIMIT) -> Any:
        if self.gone:
            raise StudentProcessGone(self.gone)
        self.seq += 1
        seq = self.seq
        data, buffers = wire.encode(payload, self._reference)
        release = sorted(self.pending_release)
        self.pending_release.clear()
        self._send({"kind": "request", "op": op, "seq": seq, "value": data, "release": release},
                   buffers)
        return self._wait(seq, timeout)

    def _send(self, message: dict[str, Any], buffers: list[bytes]) -> None:
        old = _blocked_signals()
        try:
            wire.send(self.to_child, message, buffers)
        except OSError as error:
            self._kill(f"the notebook's process stopped ({error})")
            raise StudentProcessGone(self.gone) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _receive(self, deadline: float) -> tuple[dict[str, Any], list[bytes]] | None:
        ready = self.reader.pending() or select.select(
            [self.from_child], [], [], max(0.0, min(1.0, deadline - time.monotonic())))[0]
        if not ready:
            if self.process.poll() is not None:
                self._kill(f"the notebook's process stopped (exit status "
                           f"{self.process.returncode})")
                raise StudentProcessGone(self.gone)
            return None
        old = _blocked_signals()
        try:
            return self.reader.frame()
        except (EOFError, OSError, wire.WireError) as error:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)  # an exit closes the pipe: say how it ended
            if self.process.returncode is not None:
                self._kill(f"the notebook's process stopped (exit status "
                           f"{self.process.returncode})")
            else:
                self._kill(f"the notebook's process stopped answering ({error})")
            raise StudentProcessGone(self.gone) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _wait(self, seq: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        abort: BaseException | None = None
        interrupted_at: float | None = None
        while True:
            try:
                if interrupted_at is None and time.monotonic() > deadline:
                    abort = abort or GradingTimeout(
                        f"your code did not finish within {timeout:g} s")
                    interrupted_at = self._interrupt(seq)
                if interrupted_at is not None and time.monotonic() > interrupted_at + GRACE:
                    self._kill(f"the notebook's process ignored an interrupt for {GRACE:g} s "
                               "and was stopped")
                    raise abort
                received = self._receive(deadline if interrupted_at is None
                                         else interrupted_at + GRACE)
                if received is None:
                    continue
                message, buffers = received
                kind = message.get("kind")
                if kind == "callback":
                    abort = self._serve_callback(message, buffers, seq) or abort
                    if abort is not None and interrupted_at is None:
                        interrupted_at = self._interrupt(seq)
                    continue
                if message.get("seq") != seq:
                    continue  # the late answer to a request given up on
                if abort is not None:
                    raise abort
                value = wire.decode(message.get("value"), buffers, self._resolve)
                if kind == "reply":
                    return value
                if kind == "error":
                    raise self._exception(message, value) from None
                self._kill(f"the notebook's process sent an unknown message {kind!r}")
                raise StudentProcessGone(self.gone)
            except (GradingTimeout, KeyboardInterrupt) as error:
                if abort is None or error is not abort:
                    if interrupted_at is None and self.gone is None:
                        abort = error
                        interrupted_at = self._interrupt(seq)
                        continue
                raise

    def _serve_callback(self, message: dict[str, Any], buffers: list[bytes],
                        seq: int) -> BaseException | None:
        """Run a function of ours that the student's code called; an interruption of ours
        (a time limit) is returned, to end the outer request."""
        try:
            call = wire.decode(message.get("value"), buffers, self._resolve)
            function = self.callbacks[message.get("number")]
            result = function(*call["args"], **call["kwargs"])
        except (GradingTimeout, KeyboardInterrupt) as error:
            self._send({"kind": "raise", "message": "interrupted by the grader"}, [])
            return error
        except Exception as error:  # noqa: BLE001 - reported to the student's code as raised
            public = wire.exception_fields(error)
            self._send({"kind": "raise", "message": f"{type(error).__name__}: {error}"[:2000],
                        **({"public": public[0], "fields": public[1]} if public else {})}, [])
            return None
        try:
            data, out = wire.encode(result, self._reference)
        except wire.Unsendable as error:
            self._send({"kind": "raise", "message": str(error)}, [])
            return None
        self._send({"kind": "return", "value": data}, out)
        return None

    def _exception(self, message: dict[str, Any], value: Any) -> BaseException:
        kind = str(message.get("type", "Exception"))[:80]
        text = str(message.get("message", ""))[:4000]
        if kind == "Interrupted":
            return GradingTimeout(f"your code was interrupted by the grader ({text})")
        if kind == "ForbiddenCall":
            error: BaseException = ForbiddenCall(text)
        elif kind == "CallbackError":
            error = CallbackError(text)
        elif "public" in message:  # an OutOfBlocks of the submission's: its class and fields
            try:
                error = wire.public_exception(message["public"], message.get("fields"),
                                              StudentException)
            except wire.WireError as problem:
                error = _exception_class(kind, ["Exception"])(f"{text} ({problem})")
        else:
            mro = [str(m) for m in message.get("mro", []) if isinstance(m, str)]
            error = _exception_class(kind, mro)(text)
            error.remote = value if isinstance(value, Proxy) else None
        return error

    def _interrupt(self, seq: int) -> float:
        with contextlib.suppress(OSError):
            os.write(self.interrupts, seq.to_bytes(8, "little"))
            os.kill(self.process.pid, signal.SIGINT)
        return time.monotonic()

    def _kill(self, reason: str) -> None:
        self.gone = self.gone or reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.process.wait(timeout=10)

    # what checks and the grader ask for ------------------------------------------------------

    def run_cell(self, source: str, limit: float) -> dict[str, Any]:
        return self.request("cell", {"source": source, "limit": limit}, timeout=limit + GRACE)

    def keep(self, value: Any) -> Proxy:
        """``value`` sent once, kept in the student's process, used there by reference."""
        return self.request("keep", {"value": value})

    def public(self, function: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``module:function`` of ``course_runtime`` in the student's process."""
        return self.request("public", {"function": function, "args": list(args),
                                       "kwargs": kwargs})

    @contextlib.contextmanager
    def blocked(self, paths: list[str], reason: str) -> Iterator[None]:
        """Make each dotted path raise ``ForbiddenCall`` in the student's process."""
        self.request("block", {"paths": list(paths), "reason": reason})
        try:
            yield
        finally:
            if self.gone is None:
                with contextlib.suppress(StudentProcessGone, GradingTimeout):
                    self.request("unblock", {}, timeout=30)

    @contextlib.contextmanager
    def on_one_cpu(self) -> Iterator[None]:
        """One BLAS/OpenMP and torch thread in the student's process, and every thread of it on
        one CPU (however many it starts), the very CPU the calling thread here is held to for the
        block (``_timing_cpu``): what is timed against the student's code here then shares that
        CPU and its load.
        Held apart, a loaded CPU under the student's code and a free one under the reference's
        made a curated bug lose a speed question on a busy machine."""
        self.request("threads", {"count": 1})
        try:
            with self._affinity():
                yield
        finally:
            if self.gone is None:
                with contextlib.suppress(StudentProcessGone, GradingTimeout):
                    self.request("threads", {"count": 0}, timeout=30)

    @contextlib.contextmanager
    def _affinity(self) -> Iterator[None]:
        with _timing_cpu() as cpu:
            yield from self._held_to(cpu)

    def _held_to(self, cpu: int) -> Iterator[None]:
        tasks = Path(f"/proc/{self.process.pid}/task")
        saved = {0: os.sched_getaffinity(0)}  # 0: the calling thread here
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                saved[int(task.name)] = os.sched_getaffinity(int(task.name))
                os.sched_setaffinity(int(task.name), {cpu})
        try:
            yield
        finally:
            for tid, mask in saved.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, mask)

    def close(self) -> None:
        if self.gone is None:
            with contextlib.suppress(Exception):
                self._send({"kind": "stop"}, [])
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.gone = "closed"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for fd in (self.to_child, self.from_child, self.interrupts):
            with contextlib.suppress(OSError):
                os.close(fd)


# --------------------------------------------------------------------------------------------
# What a submission must not read
# --------------------------------------------------------------------------------------------

def secret_paths(*extra: str | Path) -> list[str]:
    """The reference, the grader (checks, hidden tests) and, in a checkout of the course, its
    answer keys and history: hidden from the student's process."""
    paths: set[str] = set()
    for package in ("course_reference", "grader"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            paths.add(str(Path(location).resolve()))
    root = Path(__file__).resolve().parents[1]
    if (root / "solutions").is_dir():
        for name in ("solutions", "tests", ".git", "course_reference", "grader", "book"):
            if (root / name).exists():
                paths.add(str(root / name))
    for path in extra:
        if path and Path(path).exists():
            paths.add(str(Path(path).resolve()))
    return sorted(paths)


def unprivileged_user() -> int | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED).pw_uid
    except KeyError:
        return 65534


def start_student(workdir: Path, hide: list[str], log: Any = None) -> StudentProcess:
    user = unprivileged_user()
    if user is not None:
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, user, user)
    return StudentProcess(workdir, hide=hide, user=user, log=log)


# --------------------------------------------------------------------------------------------
# Grading a notebook with otter's test files
# --------------------------------------------------------------------------------------------

PARTIAL_RESULTS: str | None = None  # where to save the scores after each question (batch)
CELL_TIMEOUT = float(os.environ.get("COURSE_CELL_TIMEOUT", "300"))


def _stopped_cases(test_file: Any, reason: str) -> None:
    from .otter_adapter import case_result
    test_file.test_case_results = [case_result(case, False, f"❌ Test case failed\n{reason}")
                                   for case in test_file.test_cases]
    for case in test_file.test_cases:
        case.body.function_name = case.body.test_func.__name__


def _run_there(body: Any, student: StudentProcess) -> None:
    """A public test case (worth no points: the hidden ones grade) runs in the submission's
    process, where it runs in the notebook: on the objects it builds there, beside the files
    the lab ships. Its source is public: the student's copy of the lab holds it."""
    try:
        source = textwrap.dedent(inspect.getsource(body.test_func))
    except (OSError, TypeError):
        return  # no source to send: it runs here, on proxies

    def there(env: Any) -> None:
        student.request("test", {"source": source})

    body.test_func = there


def grade_notebook(submission_path: str, *, tests_glob: list[str], cwd: str | None = None,
                   test_dir: str | None = None, **otter_options: Any) -> Any:
    """Grade a notebook as ``otter.execute.grade_notebook`` does, with its code in a process of
    its own: each question's tests run where its ``grader.check`` cell stands (every question
    whose check cell is missing, after the last cell)."""
    import nbformat

    from .grade_one import CHECK_CALL
    from .otter_adapter import fail_cases_alone, grading_results, load_test_file

    fail_cases_alone()  # an interrupted case fails alone
    cwd = Path(cwd or Path(submission_path).parent).resolve()
    tests = {}
    for path in tests_glob:
        test_file = load_test_file(str(path))
        tests[test_file.name] = test_file
    notebook = nbformat.read(str(Path(cwd) / submission_path) if not Path(submission_path)
                             .is_absolute() else submission_path, as_version=4)

    workdir = Path(tempfile.mkdtemp(prefix="course-sandbox-"))
    skip = {Path(test_dir or cwd / "tests").resolve(), (cwd / "__init__.py").resolve()}
    for item in cwd.iterdir():
        if item.resolve() in skip or item.name.startswith("."):
            continue
        target = workdir / item.name
        if item.is_dir():
            shutil.copytree(item, target, symlinks=False)
        else:
            shutil.copy(item, target)
    autograder = cwd.parent if (cwd.parent / "source").is_dir() else None
    hide = secret_paths(test_dir or cwd / "tests", cwd, *(autograder and [autograder] or []))
    student = start_student(workdir, hide, log=sys.stdout)
    env = RemoteNamespace(student)
    for test_file in tests.values():
        for case in test_file.test_cases:
            if not case.hidden and not case.points:
                _run_there(case.body, student)
    graded: list[str] = []
    interrupted: list[str] = []  # the cells the per-cell limit stopped, for the batch's status

    def grade(names: list[str]) -> None:
        for name in names:
            if name in tests and name not in graded:
                graded.append(name)
                if student.gone:
                    _stopped_cases(tests[name], f"not graded: {student.gone}")
                else:
                    tests[name].run(env)
                print(f"[grader] {name}: {tests[name].score:g}/{tests[name].possible:g}",
                      flush=True)
        if PARTIAL_RESULTS:
            _save(grading_results([tests[n] for n in graded]), PARTIAL_RESULTS)

    try:
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            questions = CHECK_CALL.findall(cell.source)
            if questions:
                grade(questions)
                continue
            if "otter.Notebook(" in cell.source or student.gone:
                continue
            try:
                outcome = student.run_cell(cell.source, CELL_TIMEOUT)
            except (StudentProcessGone, GradingTimeout) as error:
                print(f"[grader] cell {index}: {error}", flush=True)
                continue
            if not outcome.get("ok"):
                status = "interrupted" if outcome.get("interrupted") else "raised"
                print(f"[grader] cell {index} {status}: {outcome.get('message')}", flush=True)
                if outcome.get("interrupted"):
                    interrupted.append(f"cell {index} ({str(outcome.get('message'))[:160]})")
        grade(sorted(tests))
    finally:
        stopped = student.gone
        student.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results = grading_results([tests[name] for name in sorted(tests)])
    if stopped:
        results.stopped = stopped  # read by the batch grader for its status column
    if interrupted:
        results.interrupted = interrupted  # likewise: graded, with cells stopped by the limit
    return results


def _save(results: Any, path: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        pickle.dump(results, f)
    os.replace(temporary, path)
