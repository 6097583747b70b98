"""Checks for Lab 4 (paged KV cache), called by the lab's hidden tests.

Graded with the submission in a process of its own (``grader.isolated``). What its code is
handed of the grader's — the reference allocator (q2), the reference ``PagedKVCache`` and the
model it runs on (q4, q5) — stays here: the submission's code gets stand-ins offering the
members the handout names (``Exposed``), each call a request to this process. The model's calls
are counted here, and the cache's blocks read here.

Each question is checked on its own: the block-table functions (q2) run on the reference
allocator, and the generation and serving loops (q4, q5) on the reference ``PagedKVCache``, so
that a bug in one question costs the points of that question only. The oracles are the
reference allocator and cache, PyTorch's ``scaled_dot_product_attention`` on dense keys, and
greedy generation without any cache. Everything runs in float64, where paged and dense attention
agree to 1e-12, so greedy tokens cannot differ by rounding.

The public tests (worth 0 points; students run them without this module) cover a few of these
cases on the student's own pieces; every such case is repeated here, in a hidden test, so that
the hidden tests alone decide the grade. The one public case that needs the reference, q2's
table program, ships as data: ``public_expectations`` runs it on the reference cache when the
lab is assigned (``expected.json``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from course_reference.serving.allocator import BlockAllocator
from course_reference.serving.attention import paged_attention
from course_reference.serving.paged_cache import PagedKVCache
from course_reference.serving.scheduler import ContinuousBatcher
from course_runtime.serving import (
    BlockTable,
    OutOfBlocks,
    Request,
    blocks_for,
    request_stream,
    serve_static,
    static_batch_size,
)
from course_runtime.testing import (
    GradingTimeout,
    assert_close,
    largest_new_tensor,
    require,
    same_attribute,
    time_limit,
)
from course_runtime.timing import call_seconds, measure_interleaved, pinned_threads
from grader.checks import check_ratio, counted_forwards, forbid, make_there, run_there
from grader.isolated import Exposed, is_remote, student_of

ISOLATED = True  # graded with the submission in a process of its own (grader.isolated)


def _dotted(function: Any) -> str:
    """The path ``forbid`` patches, read from the function itself so that it follows a move."""
    return f"{function.__module__}.{function.__qualname__}"


FORBIDDEN = [
    _dotted(paged_attention),
    _dotted(PagedKVCache._prepare),
    _dotted(ContinuousBatcher.run),
    "torch.nn.functional.scaled_dot_product_attention",
]
REASON = ("Lab 4 asks you to write the allocator, the block tables, paged attention and the "
          "serving loop yourself; the reference and PyTorch's fused attention are what yours is "
          "compared against")


LOOP_FORBIDDEN = [
    _dotted(ContinuousBatcher.run),
    _dotted(serve_static),
    "course_runtime.models.gpt.generate",
]


def guard(namespace: dict[str, Any] | None = None) -> Any:
    """Block the reference serving code (and torch's fused attention) while student code runs."""
    return forbid(FORBIDDEN, REASON, namespace)


def loop_guard(namespace: dict[str, Any] | None = None) -> Any:
    """For the loops (q4, q5), which run on the reference cache: block the reference loops."""
    return forbid(LOOP_FORBIDDEN, REASON, namespace)


def _model(name: str = "draft", secret: bool = False) -> torch.nn.Module:
    """The shipped model in float64; ``secret``: its weights moved by a little seeded noise that
    no submission knows. The loops on the reference cache run on such a model, handed to them as
    a stand-in whose weights stay here: tokens computed by a private copy of the shipped model
    (decoding without the cache it was handed) come out wrong."""
    from course_runtime.models import load

    model = load(name).double()
    if secret:
        g = torch.Generator().manual_seed(SECRET_SEED)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 * p.std()
                       if p.numel() > 1 else 0.0)
    return model


SECRET_SEED = 4_2024


def _model_there(namespace: Any, name: str = "draft") -> Any:
    """The same model where the submission's code runs (for a cache of the student's, which
    runs the model's layers there)."""
    from course_runtime.models import load

    return make_there(namespace, load, name).double()


# What the submission's code may use of the grader's objects: the members the handout names.
ALLOCATOR_MEMBERS = {"methods": ("allocate", "share", "free", "ref_count"),
                     "attributes": ("num_free", "num_blocks", "block_size")}
CACHE_MEMBERS = {"methods": ("add_sequence", "free_sequence", "select", "fork", "block_table",
                             "seq_length"),
                 "attributes": ("block_size", "num_blocks", "num_free_blocks")}


def handed_allocator(allocator: BlockAllocator, namespace: Any) -> Any:
    """The reference allocator as the submission's functions get it."""
    return Exposed(allocator, **ALLOCATOR_MEMBERS) if is_remote(namespace) else allocator


def handed(model: torch.nn.Module, cache: PagedKVCache, namespace: Any) -> tuple[Any, Any]:
    """The model and the reference cache as the submission's loop gets them: in its process,
    stand-ins whose calls run here (the model under ``no_grad``, on the cache itself)."""
    if not is_remote(namespace):
        return model, cache
    allocator = handed_allocator(cache.allocator, namespace)
    exposed_cache = Exposed(cache, methods=CACHE_MEMBERS["methods"],
                            attributes={**dict.fromkeys(CACHE_MEMBERS["attributes"]),
                                        "allocator": lambda: allocator})

    @torch.no_grad()
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return model(*args, **kwargs)

    return Exposed(model, methods={"__call__": forward, "forward": forward},
                   attributes=("config",), name="GPT"), exposed_cache


def _new_table(namespace: Any) -> Any:
    """An empty BlockTable where the submission's functions run (they change it in place)."""
    return make_there(namespace, BlockTable)


def greedy_reference(model: torch.nn.Module, prompt: Sequence[int], max_new: int) -> list[int]:
    """Greedy tokens computed without a cache: the whole sequence again at every step."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


# --------------------------------------------------------------------------------------------
# q1: the allocator
# --------------------------------------------------------------------------------------------

def check_allocator(cls: Any, seed: int, steps: int, num_blocks: int = 6,
                    namespace: dict[str, Any] | None = None) -> None:
    """Random programs of allocate / share / free on the student's allocator, against a plain
    list of the references held: free counts, reference counts and errors must agree."""
    require(BlockAllocator=cls)
    if not is_remote(cls) and isinstance(cls, type) and issubclass(cls, BlockAllocator):
        raise AssertionError("your BlockAllocator derives from the reference's: write your own")
    rng = random.Random(seed)
    with guard(namespace), time_limit(30, "your BlockAllocator"):
        theirs = cls(num_blocks, 4)
        held: list[int] = []          # one entry per reference held, in the student's numbering
        log: list[str] = []
        for _ in range(steps):
            op = rng.choice(["allocate", "allocate", "share", "free", "free"])
            if op == "allocate":
                log.append("allocate()")
                if len(set(held)) == num_blocks:
                    try:
                        theirs.allocate()
                    except OutOfBlocks as error:
                        fields = (error.needed, error.free, error.total)
                        if fields != (1, 0, num_blocks):
                            raise AssertionError(
                                f"after {'; '.join(log)}: allocate() raised OutOfBlocks"
                                f"{fields}; the handout asks for OutOfBlocks(1, 0, "
                                f"{num_blocks}): one block needed, none free, "
                                f"{num_blocks} in all") from None
                        continue
                    raise AssertionError(f"after {'; '.join(log)}: every block is taken, so "
                                         "allocate() must raise OutOfBlocks")
                block = theirs.allocate()
                if not isinstance(block, int) or not 0 <= block < num_blocks:
                    raise AssertionError(f"allocate() returned {block!r}: expected a block id "
                                         f"in 0..{num_blocks - 1}")
                if block in held:
                    raise AssertionError(f"after {'; '.join(log)}: allocate() returned block "
                                         f"{block}, which is still in use")
                held.append(block)
            elif op == "share" and held:
                block = rng.choice(held)
                log.append(f"share({block})")
                theirs.share(block)
                held.append(block)
            elif op == "free" and held:
                block = held.pop(rng.randrange(len(held)))
                log.append(f"free({block})")
                theirs.free(block)
            else:
                continue
            expected_free = num_blocks - len(set(held))
            if theirs.num_free != expected_free:
                raise AssertionError(f"after {'; '.join(log)}: num_free is {theirs.num_free}, "
                                     f"expected {expected_free} (blocks in use: "
                                     f"{sorted(set(held))})")
            for block in range(num_blocks):  # a free block's count is 0
                if theirs.ref_count(block) != held.count(block):
                    raise AssertionError(f"after {'; '.join(log)}: ref_count({block}) is "
                                         f"{theirs.ref_count(block)}, expected "
                                         f"{held.count(block)}")
        for block in list(held):
            theirs.free(block)
        if theirs.num_free != num_blocks:
            raise AssertionError(f"after freeing every reference, num_free is {theirs.num_free} "
                                 f"of {num_blocks}: blocks leaked")


def check_allocator_spec(cls: Any, namespace: dict[str, Any] | None = None) -> None:
    """The public test's program on 3 blocks, line by line what the handout asks (the public
    test runs the same program without this module)."""
    require(BlockAllocator=cls)
    with guard(namespace), time_limit(10, "your BlockAllocator"):
        allocator = cls(3, 4)
        if allocator.num_free != 3:
            raise AssertionError(f"a new allocator of 3 blocks has num_free {allocator.num_free}, "
                                 "expected 3")
        a, b = allocator.allocate(), allocator.allocate()
        if a not in range(3) or b not in range(3) or a == b:
            raise AssertionError(f"two allocate() calls gave {a!r} and {b!r}: expected two "
                                 "different block ids in 0..2")
        if allocator.num_free != 1 or allocator.ref_count(a) != 1:
            raise AssertionError(f"after two allocate(): num_free {allocator.num_free} (expected "
                                 f"1), ref_count({a}) {allocator.ref_count(a)} (expected 1)")
        allocator.share(a)
        if allocator.ref_count(a) != 2 or allocator.num_free != 1:
            raise AssertionError(f"after share({a}): ref_count({a}) {allocator.ref_count(a)} "
                                 f"(expected 2), num_free {allocator.num_free} (expected 1: "
                                 "sharing takes no block)")
        c = allocator.allocate()
        try:
            allocator.allocate()
        except OutOfBlocks:
            pass
        else:
            raise AssertionError("with all 3 blocks taken, allocate() must raise OutOfBlocks")
        allocator.free(a)
        if allocator.ref_count(a) != 1 or allocator.num_free != 0:
            raise AssertionError(f"after free({a}) of a block shared by two: ref_count "
                                 f"{allocator.ref_count(a)} (expected 1), num_free "
                                 f"{allocator.num_free} (expected 0: one user is left)")
        allocator.free(a)
        allocator.free(c)
        if allocator.ref_count(a) != 0 or allocator.num_free != 2:
            raise AssertionError(f"after freeing every reference to {a} and {c}: ref_count({a}) "
                                 f"{allocator.ref_count(a)} (expected 0), num_free "
                                 f"{allocator.num_free} (expected 2)")
        again = allocator.allocate()
        if again not in (a, c):
            raise AssertionError(f"only blocks {a} and {c} are free, but allocate() gave "
                                 f"{again!r}")


# --------------------------------------------------------------------------------------------
# q2: block tables
# --------------------------------------------------------------------------------------------

class _Copies:
    """Records the copy_block calls and mirrors them on a shadow storage."""

    def __init__(self, storage: dict[int, list[Any]]):
        self.storage, self.calls = storage, []

    def __call__(self, src: int, dst: int) -> None:
        self.calls.append((src, dst))
        self.storage[dst] = list(self.storage[src])


def check_block_tables(append_slots: Any, fork: Any, release: Any, seed: int, steps: int,
                       block_size: int = 3, num_blocks: int = 16,
                       namespace: dict[str, Any] | None = None) -> None:
    """Random programs of append / fork / release on the reference allocator. A shadow storage
    (block -> list of slot contents) is written through the slots the student returns, and
    every sequence must read back its own tokens: a wrong slot, a fork without copy-on-write,
    or a block freed too early all show as wrong data; at the end no block may be left."""
    require(append_slots=append_slots, fork=fork, release=release)
    rng = random.Random(seed)
    allocator = BlockAllocator(num_blocks, block_size)
    theirs = handed_allocator(allocator, namespace)
    storage: dict[int, list[Any]] = {b: [None] * block_size for b in range(num_blocks)}
    copy_block = _Copies(storage)
    tables: list[tuple[BlockTable, list[Any]]] = []
    log: list[str] = []
    counter = 0
    with guard(namespace), time_limit(30, "your block-table functions"):
        for _ in range(steps):
            op = rng.choice(["new", "append", "append", "append", "fork", "release"])
            if op == "new" or not tables:
                tables.append((_new_table(namespace), []))
                log.append(f"new table {len(tables) - 1}")
                continue
            i = rng.randrange(len(tables))
            table, tokens = tables[i]
            if op == "append":
                n = rng.randint(1, 2 * block_size)
                log.append(f"append_slots(table {i}, {n})")
                before = (list(table.blocks), table.num_tokens, allocator.num_free)
                first = len(tokens) // block_size  # the block the first new token goes into
                copy = first < len(table.blocks) and allocator.ref_count(table.blocks[first]) > 1
                needed = blocks_for(len(tokens) + n, block_size) - len(table.blocks) + copy
                try:
                    slots = append_slots(table, theirs, n, copy_block)
                except OutOfBlocks as error:
                    where = f"after {'; '.join(log[-6:])}: append_slots raised OutOfBlocks"
                    if (list(table.blocks), table.num_tokens) != before[:2]:
                        raise AssertionError(f"{where} but changed the table") from None
                    if needed <= before[2]:
                        raise AssertionError(f"{where}, but it needs {needed} blocks "
                                             f"({'one of them a copy, ' if copy else ''}"
                                             f"{before[2]} free): they fit") from None
                    fields = (error.needed, error.free, error.total)
                    if fields != (needed, before[2], num_blocks):
                        raise AssertionError(
                            f"{where}{fields} (needed, free, total), expected "
                            f"{(needed, before[2], num_blocks)}: the blocks it needs count the "
                            f"new ones{' and the copy of the shared one' if copy else ''}"
                            ) from None
                    continue
                slots = [(int(b), int(o)) for b, o in slots]
                if len(slots) != n:
                    raise AssertionError(f"append_slots(.., {n}) returned {len(slots)} slots")
                if table.num_tokens != len(tokens) + n:
                    raise AssertionError(f"after append_slots(.., {n}) on a table of "
                                         f"{len(tokens)} tokens, num_tokens is "
                                         f"{table.num_tokens}, expected {len(tokens) + n}")
                for position, (block, offset) in enumerate(slots, start=len(tokens)):
                    expected = (table.blocks[position // block_size], position % block_size)
                    if (block, offset) != expected:
                        raise AssertionError(f"after {'; '.join(log[-6:])}: token {position} "
                                             f"went to (block, offset) {(block, offset)}, but "
                                             f"the table {table.blocks} puts it at {expected}")
                    storage[block][offset] = counter
                    tokens.append(counter)
                    counter += 1
            elif op == "fork":
                log.append(f"fork(table {i})")
                child = fork(table, theirs)
                if child is table or run_there(same_attribute, child, table, "blocks"):
                    raise AssertionError("fork must return a new BlockTable with its own list of "
                                         "blocks (sharing the blocks themselves)")
                tables.append((child, list(tokens)))
            else:
                log.append(f"release(table {i})")
                release(table, theirs)
                tables.pop(i)
            refs: dict[int, int] = {}
            for t, toks in tables:
                if len(t.blocks) != blocks_for(len(toks), block_size):
                    raise AssertionError(f"after {'; '.join(log[-6:])}: a table of {len(toks)} "
                                         f"tokens holds {len(t.blocks)} blocks, expected "
                                         f"{blocks_for(len(toks), block_size)}")
                for b in t.blocks:
                    refs[b] = refs.get(b, 0) + 1
                read = [storage[t.blocks[p // block_size]][p % block_size]
                        for p in range(len(toks))]
                if read != toks:
                    raise AssertionError(f"after {'; '.join(log[-6:])}: a sequence reads back "
                                         f"{read} through its table, but holds {toks}: a "
                                         "shared block written without copy-on-write, or a "
                                         "wrong slot?")
            for b in range(num_blocks):
                if allocator.ref_count(b) != refs.get(b, 0):
                    raise AssertionError(f"after {'; '.join(log[-6:])}: block {b} has ref count "
                                         f"{allocator.ref_count(b)} but {refs.get(b, 0)} tables "
                                         "use it")
        for table, _ in tables:
            release(table, theirs)
    if allocator.num_free != num_blocks:
        raise AssertionError(f"after releasing every table, {num_blocks - allocator.num_free} "
                             f"of {num_blocks} blocks are still taken: release leaks")


def check_copy_on_write(append_slots: Any, fork: Any, namespace: dict[str, Any] | None = None
                        ) -> None:
    """A fork shares every block; the first append to the half-full last block copies it."""
    require(append_slots=append_slots, fork=fork)
    allocator = BlockAllocator(8, 4)
    theirs = handed_allocator(allocator, namespace)
    storage: dict[int, list[Any]] = {b: [None] * 4 for b in range(8)}
    copies = _Copies(storage)
    with guard(namespace), time_limit(10, "your block-table functions"):
        parent = _new_table(namespace)
        append_slots(parent, theirs, 6, copies)
        child = fork(parent, theirs)
        if child.blocks != parent.blocks or child.num_tokens != 6:
            raise AssertionError(f"fork of a table with blocks {parent.blocks} and 6 tokens gave "
                                 f"blocks {child.blocks} and {child.num_tokens} tokens")
        if allocator.num_free != 6 or allocator.ref_count(parent.blocks[1]) != 2:
            raise AssertionError("fork must share the blocks (one more reference each), not "
                                 f"allocate new ones: {allocator.num_free} of 8 blocks free")
        shared = parent.blocks[1]
        ((block, offset),) = append_slots(child, theirs, 1, copies)
    if copies.calls != [(shared, child.blocks[1])] or child.blocks[1] == shared:
        raise AssertionError(f"appending to the child's shared, half-full block {shared} must "
                             f"copy it to a new block first (copy_block({shared}, new)); "
                             f"copy_block calls: {copies.calls}, child blocks {child.blocks}")
    if (block, offset) != (child.blocks[1], 2) or parent.blocks[1] != shared:
        raise AssertionError(f"the child's token 6 went to {(block, offset)}, expected "
                             f"({child.blocks[1]}, 2); the parent must keep block {shared}")
    if allocator.ref_count(shared) != 1:
        raise AssertionError(f"after the copy, block {shared} is the parent's alone: ref count "
                             f"{allocator.ref_count(shared)}, expected 1")


# q2's public case: a fixed program, with what it must return and leave behind computed by the
# reference cache. No block is allocated after a release, so every allocator (whatever free
# block it picks) produces the same tables once blocks are named by the order they first
# appear, and that naming is what the expected values use.
TABLE_PROGRAM: dict[str, Any] = {"num_blocks": 8, "block_size": 4, "steps": [
    {"op": "new"},                                   # table 0
    {"op": "append", "table": 0, "n": 6},            # two blocks, the second half full
    {"op": "fork", "table": 0},                      # table 1 shares both
    {"op": "append", "table": 1, "n": 3},            # copy-on-write of the half-full block
    {"op": "append", "table": 0, "n": 2},            # table 0's block is its own again: no copy
    {"op": "append", "table": 0, "n": 1},            # a new block
    {"op": "new"},                                   # table 2
    {"op": "append", "table": 2, "n": 13},           # 4 blocks, 3 free: OutOfBlocks
    {"op": "fork", "table": 1},                      # table 3 shares table 1's three blocks
    {"op": "append", "table": 3, "n": 1},            # copy-on-write of the last one
    {"op": "append", "table": 2, "n": 8},            # the last two free blocks
    {"op": "append", "table": 0, "n": 1},            # room left in the last block
    {"op": "append", "table": 0, "n": 3},            # needs a block, none free: OutOfBlocks
    {"op": "release", "table": 1},
    {"op": "release", "table": 3},
    {"op": "release", "table": 2},
    {"op": "release", "table": 0},
]}


def describe_step(step: dict[str, Any]) -> str:
    if step["op"] == "append":
        return f"append_slots(table {step['table']}, {step['n']})"
    if step["op"] == "new":
        return "a new, empty BlockTable"
    return f"{step['op']}(table {step['table']})"


class BlockNames(dict):
    """Physical blocks renamed 0, 1, 2, ... in the order they first appear."""

    def __call__(self, block: int) -> int:
        return self.setdefault(int(block), len(self))


def table_state(name: BlockNames, tables: list[list[int]], tokens: list[int], num_free: int,
                ref_count: Callable[[int], int]) -> dict[str, Any]:
    """What a step leaves behind: every table, its tokens, num_free and each block's count."""
    named = [[name(b) for b in t] for t in tables]
    return {"tables": named, "tokens": list(tokens), "num_free": num_free,
            "ref_counts": [ref_count(b) for b in sorted(name, key=name.get)]}


def run_table_program(append_slots: Any, fork: Any, release: Any, allocator: Any,
                      program: dict[str, Any] = TABLE_PROGRAM, namespace: Any = None
                      ) -> list[dict[str, Any]]:
    """Run the program with the student's functions; one record per step (see ``table_state``)."""
    theirs = handed_allocator(allocator, namespace)
    tables: list[Any] = []
    name = BlockNames()
    records = []
    for step in program["steps"]:
        returned: Any = None
        copies: list[list[int]] = []
        if step["op"] == "new":
            tables.append(_new_table(namespace))
        elif step["op"] == "fork":
            tables.append(fork(tables[step["table"]], theirs))
        elif step["op"] == "release":
            release(tables[step["table"]], theirs)
        else:
            try:
                slots = append_slots(tables[step["table"]], theirs, step["n"],
                                     lambda src, dst: copies.append([name(src), name(dst)]))
            except OutOfBlocks:
                returned = "OutOfBlocks"
            else:
                if slots is None:
                    raise AssertionError(f"{describe_step(step)} returned None: expected the "
                                         "list of (block, offset) of each new token")
                returned = [[name(b), int(o)] for b, o in slots]
        records.append({"returned": returned, "copies": copies, **table_state(
            name, [t.blocks for t in tables], [t.num_tokens for t in tables],
            allocator.num_free, allocator.ref_count)})
    return records


def reference_table_program(program: dict[str, Any] = TABLE_PROGRAM) -> list[dict[str, Any]]:
    """The same records from the reference ``PagedKVCache``: its sequences are the tables, an
    append is one model step's ``attend`` and ``advance``, a copy on write shows as the first
    block written being replaced."""
    size = program["block_size"]
    cache = PagedKVCache(1, 1, 1, program["num_blocks"], size, dtype=torch.float64)
    seqs: list[int | None] = []
    name = BlockNames()
    records = []
    for step in program["steps"]:
        returned: Any = None
        copies: list[list[int]] = []
        if step["op"] == "new":
            seqs.append(cache.add_sequence())
        elif step["op"] == "fork":
            seqs.append(cache.fork(seqs[step["table"]]))
        elif step["op"] == "release":
            cache.free_sequence(seqs[step["table"]])
            seqs[step["table"]] = None
        else:
            seq, n = seqs[step["table"]], step["n"]
            before, start = cache.block_table(seq), cache.seq_length(seq)
            x = torch.zeros(1, 1, n, 1, dtype=torch.float64)
            cache.select([seq])
            try:
                cache.attend(0, x, x, x)
            except OutOfBlocks:
                returned = "OutOfBlocks"
            else:
                cache.advance(n)
                after, first = cache.block_table(seq), start // size
                if first < len(before) and after[first] != before[first]:
                    copies.append([name(before[first]), name(after[first])])
                returned = [[name(after[p // size]), p % size] for p in range(start, start + n)]
        live = [[] if s is None else cache.block_table(s) for s in seqs]
        tokens = [0 if s is None else cache.seq_length(s) for s in seqs]
        records.append({"returned": returned, "copies": copies, **table_state(
            name, live, tokens, cache.num_free_blocks, cache.allocator.ref_count)})
    return records


def check_table_program(append_slots: Any, fork: Any, release: Any,
                        namespace: dict[str, Any] | None = None) -> None:
    """The public test's table program, on the reference allocator, against the reference."""
    require(append_slots=append_slots, fork=fork, release=release)
    allocator = BlockAllocator(TABLE_PROGRAM["num_blocks"], TABLE_PROGRAM["block_size"])
    with guard(namespace), time_limit(10, "your block-table functions"):
        got = run_table_program(append_slots, fork, release, allocator, namespace=namespace)
    for k, (step, mine, theirs) in enumerate(zip(TABLE_PROGRAM["steps"], got,
                                                 reference_table_program())):
        for key in theirs:
            if mine[key] != theirs[key]:
                raise AssertionError(
                    f"step {k + 1} of the table program, {describe_step(step)}: {key} is "
                    f"{mine[key]}, expected {theirs[key]} (blocks numbered in the order they "
                    "first appear)")


def public_expectations() -> dict[str, Any]:
    """What the public tests compare with, computed by the reference when the lab is assigned."""
    return {"q2_tables": {**TABLE_PROGRAM, "expected": reference_table_program()}}


# --------------------------------------------------------------------------------------------
# q3: paged decode attention
# --------------------------------------------------------------------------------------------

def random_paged_case(seed: int, batch: int = 3, heads: int = 2, head_dim: int = 8,
                      block_size: int = 4, max_len: int = 40, spare: int = 7,
                      dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A scattered, NaN-poisoned paged cache of ``batch`` sequences, and their dense keys."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    per_seq = [blocks_for(int(n), block_size) for n in lens]
    num_blocks = sum(per_seq) + spare
    k_cache = torch.full((heads, num_blocks, block_size, head_dim), math.nan, dtype=dtype)
    v_cache = k_cache.clone()
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((batch, max(per_seq) + 1), num_blocks - 1, dtype=torch.long)
    dense_k, dense_v = [], []
    for b in range(batch):
        blocks = [order.pop() for _ in range(per_seq[b])]
        tables[b, :len(blocks)] = torch.tensor(blocks)
        k = torch.randn(heads, int(lens[b]), head_dim, generator=g, dtype=dtype)
        v = torch.randn(heads, int(lens[b]), head_dim, generator=g, dtype=dtype)
        for p in range(int(lens[b])):
            k_cache[:, blocks[p // block_size], p % block_size] = k[:, p]
            v_cache[:, blocks[p // block_size], p % block_size] = v[:, p]
        dense_k.append(k)
        dense_v.append(v)
    q = torch.randn(batch, heads, head_dim, generator=g, dtype=dtype)
    expected = torch.stack([F.scaled_dot_product_attention(q[b][:, None], dense_k[b], dense_v[b]
                                                           )[:, 0] for b in range(batch)])
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables,
            "context_lens": lens, "expected": expected}


def check_decode_attention(fn: Any, seed: int, cases: int,
                           namespace: dict[str, Any] | None = None) -> None:
    """The student's paged decode attention equals dense attention (torch SDPA, float64) on
    random scattered block tables whose unused slots hold NaN."""
    require(paged_decode_attention=fn)
    rng = np.random.default_rng(seed)
    for case in range(cases):
        shape = dict(batch=int(rng.integers(1, 5)), heads=int(rng.integers(1, 4)),
                     head_dim=int(rng.choice([4, 8, 16])), block_size=int(rng.choice([1, 2, 4, 8])),
                     max_len=int(rng.integers(1, 60)))
        c = random_paged_case(seed * 1000 + case, **shape)
        with guard(namespace), time_limit(30, "your paged_decode_attention"):
            got = fn(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"])
        what = (f"paged_decode_attention with {shape} and context lengths "
                f"{c['context_lens'].tolist()}")
        assert_close(torch.as_tensor(got).detach().numpy(), c["expected"].numpy(), what=what,
                     atol=1e-9, rtol=1e-9)


def public_decode_case() -> dict[str, torch.Tensor]:
    """q3's public case, built as the public test builds it: three sequences in scattered
    blocks of 4, every slot no sequence holds poisoned with NaN."""
    g = torch.Generator().manual_seed(0)
    tables = torch.tensor([[7, 2, 9], [0, 5, 3], [8, 8, 8]])
    lens = torch.tensor([6, 12, 1])
    k_cache, v_cache = (torch.randn(2, 10, 4, 8, generator=g, dtype=torch.float64)
                        for _ in range(2))
    q = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    dense = [[c[:, tables[b]].flatten(1, 2)[:, :lens[b]] for c in (k_cache, v_cache)]
             for b in range(3)]
    expected = torch.stack([F.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0]
                            for b, (k, v) in enumerate(dense)])
    held = torch.zeros(10, 4, dtype=torch.bool)
    for b in range(3):
        for p in range(int(lens[b])):
            held[tables[b, p // 4], p % 4] = True
    k_cache[:, ~held] = math.nan
    v_cache[:, ~held] = math.nan
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables,
            "context_lens": lens, "expected": expected}


def check_decode_public_case(fn: Any, namespace: dict[str, Any] | None = None) -> None:
    """The public test's case, against dense attention and the reference's paged attention."""
    require(paged_decode_attention=fn)
    c = public_decode_case()
    args = (c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"])
    with guard(namespace), time_limit(30, "your paged_decode_attention"):
        got = fn(*args)
    got = None if got is None else torch.as_tensor(got).detach().numpy()
    what = "paged_decode_attention on 3 sequences of 6, 12 and 1 keys (unused slots NaN)"
    assert_close(got, c["expected"].numpy(), what=what, atol=1e-9, rtol=1e-9)
    assert_close(got, _reference_decode(*args).numpy(), what=what, atol=1e-9, rtol=1e-9)


def check_no_dense_gather(fn: Any, namespace: dict[str, Any] | None = None) -> None:
    """The structural test: on 64-token contexts in blocks of 4, no tensor the student's code
    creates may hold more than a quarter of one sequence's keys (all heads): the keys are read
    block by block (or up to four blocks at a time), never gathered into a dense tensor, not
    even one (sequence, head) at a time. Views of the cache copy nothing and are allowed."""
    require(paged_decode_attention=fn)
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(2, 40, 4, 8, generator=g, dtype=torch.float64)
    v_cache = torch.randn(2, 40, 4, 8, generator=g, dtype=torch.float64)
    tables = torch.randperm(40, generator=g)[:32].view(2, 16)
    q = torch.randn(2, 2, 8, generator=g, dtype=torch.float64)
    full = 2 * 2 * 64 * 8                       # every key of the batch: batch*heads*64*Dh
    limit = 2 * 64 * 8 // 4                     # a quarter of one sequence's: heads*64*Dh/4
    with guard(namespace), time_limit(30, "your paged_decode_attention"):
        # Recorded where the function runs: the tensors it makes are there.
        got, largest, op = run_there(largest_new_tensor, fn, q, k_cache, v_cache, tables,
                                     torch.tensor([64, 64]))
    expected = _reference_decode(q, k_cache, v_cache, tables, torch.tensor([64, 64]))
    assert_close(None if got is None else torch.as_tensor(got).detach().numpy(),
                 expected.numpy(), what="paged_decode_attention in the structural test",
                 atol=1e-9, rtol=1e-9)
    if largest > limit:
        raise AssertionError(f"your paged_decode_attention made a tensor of {largest} "
                             f"elements ({op}); all the keys of the batch are {full}, "
                             f"one sequence's {4 * limit}: read the cache one block at a "
                             "time with an online softmax, not by gathering the blocks into a "
                             "dense tensor first (not even one sequence or head at a time)")


# --------------------------------------------------------------------------------------------
# q4, q5: generation and serving loops
# --------------------------------------------------------------------------------------------

def prompts_for(seed: int, count: int, vocab_size: int, longest: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab_size, int(rng.integers(1, longest + 1)))]
            for _ in range(count)]


PUBLIC_TEXTS = ("Call me Ishmael.", "The whale", "It was")      # q4's public prompts


def check_generate(generate_paged: Any, seed: int = 0, count: int = 3, max_new: int = 10,
                   make_cache: Callable[..., Any] | None = None, num_blocks: int = 64,
                   block_size: int = 4, texts: Sequence[str] | None = None,
                   namespace: dict[str, Any] | None = None) -> None:
    """Greedy tokens through the paged cache equal greedy tokens without a cache, and every
    block is free afterwards. The prompts are ``count`` random ones, or ``texts`` encoded.
    ``make_cache(model, num_blocks, block_size)`` builds the cache (default: the reference
    PagedKVCache)."""
    require(generate_paged=generate_paged)
    model = _model(secret=make_cache is None)
    if texts is None:
        prompts = prompts_for(seed, count, model.config.vocab_size)
    else:
        from course_runtime.models import load_tokenizer

        prompts = [load_tokenizer().encode(t) for t in texts]
    if make_cache is None:  # the reference cache, and the model, stay here
        cache = PagedKVCache.for_model(model, num_blocks, block_size)
        their_model, their_cache = handed(model, cache, namespace)
    else:  # the student's cache runs the model's layers where it lives
        their_model = _model_there(namespace) if is_remote(make_cache) else model
        cache = their_cache = make_cache(their_model, num_blocks, block_size)
    with loop_guard(namespace), time_limit(60, "your generate_paged"), \
            model_calls(model) as shapes:
        got = generate_paged(their_model, prompts, max_new, their_cache)
    if make_cache is None:  # the model ran here: its calls were seen
        expected_calls = ([(1, len(p)) for p in prompts]
                          + [(len(prompts), 1)] * (max_new - 1))
        if shapes != expected_calls:
            raise AssertionError(
                f"generate_paged called the model on batches of (rows, tokens) {_runs(shapes)}; "
                f"the handout asks for each prompt alone, then one call per step on all "
                f"{len(prompts)} sequences together, one new token each: "
                f"{_runs(expected_calls)}")
    for i, prompt in enumerate(prompts):
        expected = greedy_reference(model, prompt, max_new)
        if list(map(int, got[i])) != expected:
            raise AssertionError(f"prompt {i} ({len(prompt)} tokens): generated {list(got[i])}, "
                                 f"greedy decoding without a cache gives {expected}")
    if cache.allocator.num_free != num_blocks:
        raise AssertionError(f"after generate_paged, {num_blocks - cache.allocator.num_free} of "
                             f"{num_blocks} blocks are still taken: free every sequence when "
                             "it is done")


@contextlib.contextmanager
def model_calls(model: torch.nn.Module) -> Any:
    """The (rows, tokens) of every forward pass of ``model`` (here, in the grader) in the
    block."""
    shapes: list[tuple[int, int]] = []

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        shapes.append((int(shape[0]), int(shape[1])) if len(shape) == 2 else (0, 0))

    handle = model.embed.register_forward_pre_hook(hook)
    try:
        yield shapes
    finally:
        handle.remove()


def _runs(shapes: list[tuple[int, int]]) -> str:
    """``[(1, 5), (3, 1), (3, 1)]`` as ``(1, 5), (3, 1) x 2``."""
    runs: list[list[Any]] = []
    for shape in shapes:
        if runs and runs[-1][0] == shape:
            runs[-1][1] += 1
        else:
            runs.append([shape, 1])
    text = ", ".join(f"{s}" + (f" x {n}" if n > 1 else "") for s, n in runs[:12])
    return text + (", ..." if len(runs) > 12 else "") if runs else "no calls"


def _serve(serve: Any, model: torch.nn.Module, requests: list[Request], num_blocks: int,
           block_size: int, max_batch: int, namespace: dict[str, Any] | None
           ) -> tuple[dict[int, list[int]], int, PagedKVCache]:
    cache = PagedKVCache.for_model(model, num_blocks, block_size)
    their_model, their_cache = handed(model, cache, namespace)
    with loop_guard(namespace), time_limit(60, "your serve"):
        try:
            outputs, steps = serve(their_model, requests, their_cache, max_batch)
        except OutOfBlocks as error:
            raise AssertionError(f"serve ran out of blocks ({error}): admit a request only "
                                 "when the free blocks cover everything it will need") from None
    return outputs, steps, cache


def check_serve(serve: Any, seed: int, count: int, num_blocks: int, max_batch: int = 8,
                block_size: int = 4, namespace: dict[str, Any] | None = None) -> None:
    """The student's continuous-batching loop returns every request's greedy tokens, never
    runs out of blocks, frees every block, and takes no more model calls than one prefill per
    request plus one decode step per step of the reference's schedule (with a margin)."""
    require(serve=serve)
    model = _model(secret=True)
    requests = request_stream(count, model.config.vocab_size, seed=seed, prompt_len=(1, 20),
                              output_len=(1, 24))
    with counted_forwards(model=model) as calls:
        outputs, steps, cache = _serve(serve, model, requests, num_blocks, block_size,
                                       max_batch, namespace)
    if steps != len(calls["model"]):
        raise AssertionError(f"serve returned steps={steps}, but it called the model "
                             f"{len(calls['model'])} times: steps counts model calls")
    if max(calls["model"], default=0) > max_batch:
        raise AssertionError(f"serve ran a batch of {max(calls['model'])} sequences with "
                             f"max_batch={max_batch}: admit while fewer than max_batch run")
    for r in requests:
        expected = greedy_reference(model, r.prompt, r.max_new_tokens)
        if list(map(int, outputs.get(r.id, []))) != expected:
            raise AssertionError(f"request {r.id} ({len(r.prompt)}-token prompt, "
                                 f"{r.max_new_tokens} new): got {outputs.get(r.id)}, "
                                 f"expected {expected}")
    if cache.allocator.num_free != num_blocks or cache.tables:
        raise AssertionError(f"after serve, {num_blocks - cache.allocator.num_free} blocks and "
                             f"{len(cache.tables)} sequences are left: free each request's "
                             "sequence when it finishes")
    bound = _step_bound(model, requests, num_blocks, block_size, max_batch)
    if steps > bound:
        raise AssertionError(f"serve took {steps} model calls; continuous batching needs at "
                             f"most {bound} here: admit waiting requests as soon as blocks are "
                             "free, not when the whole batch is done")
    check_never_fits(serve, model, num_blocks, block_size, max_batch, namespace)
    check_serve_edges(serve, model, namespace)


def check_serve_edges(serve: Any, model: torch.nn.Module,
                      namespace: dict[str, Any] | None = None) -> None:
    """The edges of the admission rule, on a cache of 4 blocks of 4: a request that needs the
    whole cache is served (it fits); a second one waits until the first has given its blocks
    back (admitting it at once runs out); requests of one new token are done at their prefill
    (one model call each, nothing left running)."""
    num_blocks, block_size = 4, 4
    whole = Request(id=0, prompt=tuple(range(1, num_blocks * block_size - 1)), max_new_tokens=2)
    small = Request(id=1, prompt=(5,), max_new_tokens=3)
    single = [Request(id=2, prompt=(3, 1, 4), max_new_tokens=1),
              Request(id=3, prompt=(1, 5, 9, 2, 6), max_new_tokens=1)]
    cases = [([whole, small], "a request of exactly the cache's 4 blocks, then one of 1 block"),
             (single, "two requests of one new token each")]
    for requests, what in cases:
        with counted_forwards(model=model) as calls:
            try:
                outputs, steps, cache = _serve(serve, model, requests, num_blocks, block_size,
                                               8, namespace)
            except ValueError as error:
                raise AssertionError(f"{what}, on a cache of {num_blocks} blocks of "
                                     f"{block_size}: serve raised ValueError ({error}), but "
                                     "every request fits in the cache") from None
        for r in requests:
            expected = greedy_reference(model, r.prompt, r.max_new_tokens)
            if list(map(int, outputs.get(r.id, []))) != expected:
                raise AssertionError(f"{what}: request {r.id} ({len(r.prompt)}-token prompt, "
                                     f"{r.max_new_tokens} new) got {outputs.get(r.id)}, "
                                     f"expected {expected}: a request is done as soon as it "
                                     "has its max_new_tokens tokens, even at its prefill")
        if steps != len(calls["model"]) or cache.allocator.num_free != num_blocks:
            raise AssertionError(f"{what}: serve returned steps={steps} after "
                                 f"{len(calls['model'])} model calls and left "
                                 f"{num_blocks - cache.allocator.num_free} blocks taken")
        if requests is single and steps != len(single):
            raise AssertionError(f"{what}: serve called the model {steps} times; each is done "
                                 "at its prefill, so one call each is all it takes")


def check_never_fits(serve: Any, model: torch.nn.Module, num_blocks: int, block_size: int,
                     max_batch: int, namespace: dict[str, Any] | None = None) -> None:
    """A request that needs more blocks than the whole cache has must raise ValueError (not
    wait for blocks that can never come). A right loop raises at once, so 5 s is ample; a loop
    that waits spins that long in each of the four cases that call this, and a grading with
    20 s each ran past the mutation harness's limit per mutant on a loaded machine."""
    prompt = tuple(range(1, 1 + block_size))
    too_long = Request(id=0, prompt=prompt,
                       max_new_tokens=num_blocks * block_size + 1 - len(prompt))
    cache = PagedKVCache.for_model(model, num_blocks, block_size)
    their_model, their_cache = handed(model, cache, namespace)
    try:
        with loop_guard(namespace), time_limit(5, "serve with a request that can never fit"):
            serve(their_model, [too_long], their_cache, max_batch)
    except ValueError:
        return
    except GradingTimeout:
        raise AssertionError(f"a request of {too_long.max_len} tokens needs "
                             f"{blocks_for(too_long.max_len, block_size)} blocks of a "
                             f"{num_blocks}-block cache: serve waited for blocks that never "
                             "come; raise ValueError instead") from None
    raise AssertionError(f"a request of {too_long.max_len} tokens needs "
                         f"{blocks_for(too_long.max_len, block_size)} blocks of a {num_blocks}-"
                         "block cache: serve should raise ValueError")


def _step_bound(model: torch.nn.Module, requests: list[Request], num_blocks: int,
                block_size: int, max_batch: int) -> int:
    """Model calls of the reservation policy (admit when the blocks for a request's whole
    length are free; one prefill call per request; one decode call per step), simulated
    without running the model, plus 25 %."""
    reserved, running, waiting, steps = 0, [], list(requests), 0
    while waiting or running:
        while waiting and len(running) < max_batch and reserved + blocks_for(
                waiting[0].max_len, block_size) <= num_blocks:
            r = waiting.pop(0)
            reserved += blocks_for(r.max_len, block_size)
            running.append([r, 1])
            steps += 1
        done = [x for x in running if x[1] >= x[0].max_new_tokens]
        for x in done:
            running.remove(x)
            reserved -= blocks_for(x[0].max_len, block_size)
        if running:
            steps += 1
            for x in running:
                x[1] += 1
    return int(steps * 1.25) + 1


# --------------------------------------------------------------------------------------------
# q6: performance
# --------------------------------------------------------------------------------------------

def check_steps_vs_static(serve: Any, seed: int, count: int, bound: float = 2.0,
                          rows: int = 6, namespace: dict[str, Any] | None = None) -> float:
    """At the same KV memory (``rows`` times the longest request), static padded batching (the
    reference) takes at least ``bound`` times as many model calls as the student's continuous
    batching: a count, not a time."""
    require(serve=serve)
    model = _model(secret=True)
    requests = request_stream(count, model.config.vocab_size, seed=seed, prompt_len=(2, 16),
                              output_len=(2, 96))
    max_len = max(r.max_len for r in requests)
    block_size = 4
    kv_slots = rows * blocks_for(max_len, block_size) * block_size
    outputs, steps, _ = _serve(serve, model, requests, kv_slots // block_size, block_size,
                               64, namespace)
    static = serve_static(model, requests, batch_size=static_batch_size(kv_slots, max_len),
                          max_len=max_len)
    if outputs != static.outputs:
        raise AssertionError("your serve and static batching generated different tokens")
    ratio = static.steps / steps
    print(f"{len(requests)} requests in {kv_slots} KV slots: static batching {static.steps} "
          f"model calls, yours {steps}: {ratio:.2f}x fewer")
    if ratio < bound:
        raise AssertionError(f"static batching took {static.steps} model calls and yours "
                             f"{steps}: only {ratio:.2f}x fewer, expected at least {bound:g}x")
    return ratio


def check_speed(fn: Any, bound: float, rounds: int = 15, seed: int = 5,
                namespace: dict[str, Any] | None = None) -> float:
    """Time of the student's paged decode attention over the reference's, the fastest of
    ``rounds`` interleaved calls each, on a decode step of 16 sequences of up to 256 tokens in
    blocks of 16 (float32): a call takes about 2 ms, which one preemption on a busy grading
    machine doubles, and a median of 15 such calls let unrelated bugs lose this question."""
    require(paged_decode_attention=fn)
    c = random_paged_case(seed, batch=16, heads=6, head_dim=32, block_size=16, max_len=256,
                          dtype=torch.float32)
    c["k_cache"] = torch.nan_to_num(c["k_cache"])
    c["v_cache"] = torch.nan_to_num(c["v_cache"])
    args = (c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"])

    def timer(call: Callable[[], Any]) -> Callable[[], float]:
        def once() -> float:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        return once

    remote = is_remote(fn, namespace)
    with contextlib.ExitStack() as stack:
        stack.enter_context(guard(namespace))
        stack.enter_context(time_limit(120, "timing your paged_decode_attention"))
        stack.enter_context(pinned_threads(1))  # one thread on every grading path: one grade
        if remote:  # the same there, and every thread of that process on one CPU
            stack.enter_context(student_of(fn, namespace).on_one_cpu())
        got = fn(*args)
        expected = _reference_decode(*args)
        assert_close(None if got is None else torch.as_tensor(got).detach().numpy(),
                     expected.numpy(), what="paged_decode_attention on the timed workload",
                     atol=1e-4, rtol=1e-4)
        if remote:  # timed in its process, with the arguments sent there once
            kept = student_of(fn, namespace).keep(args)
            yours = lambda: run_there(call_seconds, fn, kept)  # noqa: E731
        else:
            yours = timer(lambda: fn(*args))
        times = measure_interleaved({"yours": yours, "reference": timer(
            lambda: _reference_decode(*args))}, rounds)
    return check_ratio(times["yours"], times["reference"], what="paged_decode_attention",
                       peer_name="the reference", bound=bound, unit="call", fastest=True)


_PAGED_ATTENTION = paged_attention


def _reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """The reference, one block per step, for a single query per sequence (captured before any
    ``guard`` replaces the public name)."""
    return _PAGED_ATTENTION(q[:, :, None], k_cache, v_cache, block_tables, context_lens)[:, :, 0]


__all__ = ["check_allocator", "check_allocator_spec", "check_block_tables",
           "check_copy_on_write", "check_decode_attention", "check_decode_public_case",
           "check_generate", "check_no_dense_gather", "check_serve", "check_speed",
           "check_steps_vs_static", "check_table_program", "greedy_reference",
           "public_decode_case", "public_expectations", "random_paged_case",
           "reference_table_program", "run_table_program"]
