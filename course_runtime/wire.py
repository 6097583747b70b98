"""The channel between the grader and the process that runs a student's notebook.

Messages carry plain data only, never pickles: ``None``, booleans, numbers, strings, bytes,
tuples, lists, dicts, slices, NumPy arrays and scalars of numeric dtypes, torch tensors
(their values: a tensor arrives as a plain CPU ``torch.Tensor``, without its graph or
``requires_grad``), and the named tuples and frozen dataclasses of the course's public code in
``NAMED_TUPLES`` and ``DATACLASSES`` (a pipeline's ``Action``, a serving ``Request``, a model's
``GPTConfig``: the receiver builds its own from the values). Anything else stays in the process that
owns it and crosses as a numbered reference (a *handle*, for an object of the
student's; a *callback*, for a function of the grader's). A value received is a fresh copy: an
array that arrives is a plain ``numpy.ndarray`` built from bytes, whatever class it had on the
other side, so a comparison made with it cannot be steered by the sender.

Frame: an 8-byte little-endian length, then that many bytes: a 4-byte length of the JSON header,
the header, and the raw buffers it names (in order).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_FRAME = 1 << 31  # bytes: a larger frame is a protocol error, not a grade
MAX_DEPTH = 32
SCALARS = (type(None), bool, int, float, str)
NUMERIC_KINDS = "biufc"
# torch dtypes that cross, by name; bfloat16 and float16 travel as their 16-bit patterns
TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool", "complex64", "complex128")


# Named tuples of the course's public code that cross as values: the class is named, and the
# receiver builds its own instance of it from the values (a pipeline schedule's actions).
NAMED_TUPLES = ("course_runtime.pipeline:Action",)
DATACLASSES = ("course_runtime.serving.workload:Request", "course_runtime.models.gpt:GPTConfig")
# Exceptions of the course's public code that keep their class and fields across the channel
# (a check catches an ``OutOfBlocks`` of the submission's and reads how many blocks it needed;
# a submission's code catches one raised by the grader's allocator it was handed).
PUBLIC_EXCEPTIONS = {"course_runtime.serving.blocks:OutOfBlocks": ("needed", "free", "total")}


class WireError(Exception):
    """A message that is not in the channel's format."""


class Unsendable(TypeError):
    """An object that cannot cross the channel as a value or a reference."""


def encode(obj: Any, reference: Callable[[Any], dict[str, Any]]) -> tuple[Any, list[bytes]]:
    """``obj`` as JSON-ready data plus buffers; ``reference(x)`` encodes what is not a value."""
    buffers: list[bytes] = []

    def walk(x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise Unsendable("nesting too deep to send")
        kind = type(x)
        if kind in SCALARS:
            if kind is float and not math.isfinite(x):
                return {"$f": repr(x)}
            return x
        if kind is tuple:
            return {"$t": [walk(v, depth + 1) for v in x]}
        if issubclass(kind, tuple) and f"{kind.__module__}:{kind.__qualname__}" in NAMED_TUPLES:
            return {"$nt": f"{kind.__module__}:{kind.__qualname__}",
                    "v": [walk(v, depth + 1) for v in tuple.__iter__(x)]}
        if kind is list:
            return [walk(v, depth + 1) for v in x]
        if kind is dict:
            return {"$d": [[walk(k, depth + 1), walk(v, depth + 1)] for k, v in x.items()]}
        if kind is bytes:
            buffers.append(x)
            return {"$b": len(buffers) - 1}
        if kind is slice:
            return {"$sl": [walk(x.start, depth + 1), walk(x.stop, depth + 1),
                            walk(x.step, depth + 1)]}
        if x is Ellipsis:
            return {"$e": 1}
        if isinstance(x, np.ndarray) and x.dtype.kind in NUMERIC_KINDS:
            plain = np.array(np.ndarray.view(x, np.ndarray), copy=True, order="C")
            buffers.append(plain.tobytes())
            return {"$a": len(buffers) - 1, "dtype": plain.dtype.str, "shape": list(plain.shape)}
        if isinstance(x, np.generic) and np.dtype(kind).kind in NUMERIC_KINDS:
            buffers.append(np.asarray(x).tobytes())
            return {"$s": len(buffers) - 1, "dtype": np.dtype(kind).str}
        torch = sys.modules.get("torch")  # never imported here: a tensor means it is loaded
        if torch is not None and isinstance(x, torch.Tensor):
            return tensor(x)
        if f"{kind.__module__}:{kind.__qualname__}" in DATACLASSES:
            import dataclasses
            return {"$dc": f"{kind.__module__}:{kind.__qualname__}",
                    "v": [[f.name, walk(getattr(x, f.name), depth + 1)]
                          for f in dataclasses.fields(x) if f.init]}
        return reference(x)

    def tensor(x: Any) -> Any:
        torch = sys.modules["torch"]
        plain = torch.Tensor.detach(x).cpu().contiguous()
        dtype = str(plain.dtype).removeprefix("torch.")
        if dtype not in TORCH_DTYPES:
            raise Unsendable(f"a tensor of dtype {plain.dtype}")
        if plain.dtype in (torch.bfloat16, torch.float16):
            plain = plain.view(torch.int16)
        buffers.append(plain.numpy().tobytes())
        return {"$pt": len(buffers) - 1, "dtype": dtype, "shape": list(plain.shape)}

    return walk(obj, 0), buffers


def _tensor(data: bytes, dtype_name: str, shape: tuple[int, ...]) -> Any:
    import torch

    if dtype_name not in TORCH_DTYPES:
        raise WireError(f"a tensor of dtype {dtype_name}")
    dtype = getattr(torch, dtype_name)
    carried = torch.int16 if dtype in (torch.bfloat16, torch.float16) else dtype
    flat = torch.frombuffer(bytearray(data), dtype=carried) if data else torch.empty(
        0, dtype=carried)
    if flat.numel() != math.prod(shape):
        raise WireError("a tensor whose bytes do not match its shape")
    return flat.view(dtype).reshape(shape)


def _named_tuple(name: Any, values: list[Any]) -> tuple[Any, ...]:
    if name not in NAMED_TUPLES:
        raise WireError(f"a named tuple of a class that does not cross: {name!r}")
    import importlib

    module, _, qualname = str(name).partition(":")
    kind = getattr(importlib.import_module(module), qualname)
    try:
        return kind(*values)
    except TypeError as error:
        raise WireError(f"a {qualname} that cannot be built from {values!r}: {error}") from None


def _public_class(name: Any, allowed: Any) -> type:
    import importlib

    if name not in allowed:
        raise WireError(f"a value of a class that does not cross: {name!r}")
    module, _, qualname = str(name).partition(":")
    return getattr(importlib.import_module(module), qualname)


def _dataclass(name: Any, fields: Any) -> Any:
    import dataclasses

    kind = _public_class(name, DATACLASSES)
    names = {f.name for f in dataclasses.fields(kind) if f.init}
    if type(fields) is not list or not all(type(f) is list and len(f) == 2 and f[0] in names
                                           for f in fields):
        raise WireError(f"a {kind.__qualname__} with fields it does not have")
    try:
        return kind(**dict(fields))
    except (TypeError, ValueError) as error:
        raise WireError(f"a {kind.__qualname__} that cannot be built: {error}") from None


def exception_fields(error: BaseException) -> tuple[str, list[Any]] | None:
    """``(name, values)`` for an exception of ``PUBLIC_EXCEPTIONS`` whose fields are plain
    scalars; ``None`` for any other."""
    for name, fields in PUBLIC_EXCEPTIONS.items():
        module, _, qualname = name.partition(":")
        public = sys.modules.get(module)
        if public is not None and isinstance(error, getattr(public, qualname, ())):
            values = [getattr(error, f, None) for f in fields]
            if all(type(v) in SCALARS for v in values):
                return name, values
    return None


def public_exception(name: Any, values: Any, mixin: type | None = None) -> BaseException:
    """The exception ``exception_fields`` described, built here from its values (an instance
    of a subclass that also derives from ``mixin``, when one is given)."""
    kind = _public_class(name, PUBLIC_EXCEPTIONS)
    if type(values) is not list or not all(type(v) in SCALARS for v in values):
        raise WireError(f"a {kind.__qualname__} with fields that are not plain values")
    if mixin is not None:
        kind = _MIXED.setdefault((kind, mixin), type(kind.__name__, (kind, mixin),
                                                    {"__module__": kind.__module__}))
    try:
        return kind(*values)
    except (TypeError, ValueError) as error:
        raise WireError(f"a {kind.__qualname__} that cannot be built: {error}") from None


_MIXED: dict[tuple[type, type], type] = {}


def decode(data: Any, buffers: list[bytes], resolve: Callable[[dict[str, Any]], Any]) -> Any:
    """The inverse of :func:`encode`; ``resolve`` turns a reference back into an object."""

    def buffer(index: Any) -> bytes:
        if type(index) is not int or not 0 <= index < len(buffers):
            raise WireError("a reference to a buffer that was not sent")
        return buffers[index]

    def walk(x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError("nesting too deep")
        if type(x) in SCALARS:
            return x
        if type(x) is list:
            return [walk(v, depth + 1) for v in x]
        if type(x) is not dict or len(x) == 0:
            raise WireError(f"unexpected {type(x).__name__}")
        if "$t" in x:
            return tuple(walk(v, depth + 1) for v in x["$t"])
        if "$nt" in x:
            return _named_tuple(x["$nt"], [walk(v, depth + 1) for v in x.get("v", ())])
        if "$dc" in x:
            return _dataclass(x["$dc"], [[f[0], walk(f[1], depth + 1)] if type(f) is list
                                         and len(f) == 2 else f for f in x.get("v", ())])
        if "$d" in x:
            return {walk(k, depth + 1): walk(v, depth + 1) for k, v in x["$d"]}
        if "$f" in x:
            if x["$f"] not in ("nan", "inf", "-inf"):
                raise WireError("a float that is not nan or inf")
            return float(x["$f"])
        if "$b" in x:
            return buffer(x["$b"])
        if "$sl" in x:
            return slice(*(walk(v, depth + 1) for v in x["$sl"]))
        if "$e" in x:
            return Ellipsis
        if "$a" in x:
            dtype = np.dtype(x["dtype"])
            if dtype.kind not in NUMERIC_KINDS:
                raise WireError(f"an array of dtype {dtype}")
            shape = tuple(int(d) for d in x["shape"])
            return np.frombuffer(buffer(x["$a"]), dtype=dtype).reshape(shape).copy()
        if "$s" in x:
            dtype = np.dtype(x["dtype"])
            if dtype.kind not in NUMERIC_KINDS:
                raise WireError(f"a scalar of dtype {dtype}")
            return np.frombuffer(buffer(x["$s"]), dtype=dtype)[0]
        if "$pt" in x:
            return _tensor(buffer(x["$pt"]), str(x.get("dtype")),
                           tuple(int(d) for d in x.get("shape", ())))
        return resolve(x)

    return walk(data, 0)


def write_frame(fd: int, header: Any, buffers: list[bytes]) -> None:
    head = json.dumps(header, allow_nan=False).encode()
    body = struct.pack("<I", len(head)) + head + b"".join(buffers)
    view = memoryview(struct.pack("<Q", len(body)) + body)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Reader:
    """Frames from a file descriptor, read in large chunks (one system call per message)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()

    def pending(self) -> bool:
        """Whether a whole frame is already buffered."""
        if len(self.buffer) < 8:
            return False
        (length,) = struct.unpack_from("<Q", self.buffer)
        return len(self.buffer) >= 8 + length

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = os.read(self.fd, max(1 << 16, min(n - len(self.buffer), 1 << 24)))
            if not chunk:
                raise EOFError("the other side closed the channel")
            self.buffer += chunk

    def frame(self) -> tuple[Any, list[bytes]]:
        self._fill(8)
        (length,) = struct.unpack_from("<Q", self.buffer)
        if length > MAX_FRAME:
            raise WireError(f"a frame of {length} bytes")
        self._fill(8 + length)
        body = bytes(self.buffer[8:8 + length])
        del self.buffer[:8 + length]
        if len(body) < 4:
            raise WireError("a frame too short for its header")
        (head_length,) = struct.unpack_from("<I", body)
        try:
            header = json.loads(body[4:4 + head_length])
        except ValueError as error:
            raise WireError(f"a header that is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise WireError("a message that is not an object")
        sizes = header.get("sizes", [])
        if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes):
            raise WireError("a header without buffer sizes")
        buffers, offset = [], 4 + head_length
        for size in sizes:
            buffers.append(body[offset:offset + size])
            offset += size
        if offset != len(body):
            raise WireError("buffers that do not add up to the frame")
        return header, buffers


def send(fd: int, message: dict[str, Any], buffers: list[bytes]) -> None:
    """Write ``message`` (a dict of JSON-ready data) with its buffers."""
    write_frame(fd, {**message, "sizes": [len(b) for b in buffers]}, buffers)


