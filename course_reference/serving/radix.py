"""A radix-tree prefix cache: which prefix of a new prompt has its KV cache already computed?

SGLang's RadixAttention (Zheng et al., "SGLang: Efficient Execution of Structured Language Model
Programs", NeurIPS 2024, section 3) keeps the KV cache of finished requests instead of freeing
it, indexed by a radix tree over token ids: each edge is labelled with a run of tokens, each
path from the root spells a cached prefix. A new request walks down the tree as far as its
tokens match and reuses the KV cache of the matched prefix; only the rest is prefilled. When
memory runs out, the least recently used leaves are evicted first (their prefixes are the least
likely to be shared again), and a node never goes before its children, so a cached prefix is
always whole.

This module keeps token ids only (the tree, not the tensors) and counts tokens, which is what a
scheduler needs to decide; the serving engine keeps the KV blocks each node points to.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_use: int = 0


class RadixCache:
    """Cached token prefixes in a radix tree, at most ``capacity`` tokens, LRU leaf eviction."""

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens, got {capacity}")
        self.capacity = capacity
        self.root = _Node((), None)
        self.size = 0                       # tokens held: the sum of every edge's length
        self.evicted = 0                    # tokens evicted so far
        self._clock = itertools.count(1)

    def match(self, tokens: Sequence[int]) -> int:
        """Length of the longest cached prefix of ``tokens``; marks its nodes as just used."""
        return self._walk(tuple(tokens), next(self._clock))[1]

    def insert(self, tokens: Sequence[int]) -> int:
        """Cache all of ``tokens`` (the prompt and output of a finished request, say), evicting
        least recently used leaves if needed. Returns how many tokens were already cached."""
        tokens = tuple(tokens)
        if self.capacity is not None and len(tokens) > self.capacity:
            raise ValueError(f"a sequence of {len(tokens)} tokens cannot fit in a prefix cache "
                             f"of {self.capacity} tokens")
        now = next(self._clock)
        node, matched = self._walk(tokens, now)
        node = self._split_at(node, matched)
        new = tokens[matched:]
        if not new:
            return matched
        if self.capacity is not None:
            protected = self._path(node)
            self._evict(self.size + len(new) - self.capacity, protected)
        child = _Node(new, node, last_use=now)
        node.children[new[0]] = child
        self.size += len(new)
        return matched

    def serve(self, tokens: Sequence[int]) -> int:
        """One request: how many of its tokens hit the cache, then cache them all."""
        return self.insert(tokens)

    # ---- the tree ------------------------------------------------------------------------

    def _walk(self, tokens: tuple[int, ...], now: int) -> tuple[_Node, int]:
        """The deepest node whose path is a prefix of ``tokens``, and the matched length
        (which may end inside the edge of one of that node's children)."""
        node, i = self.root, 0
        node.last_use = now
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = _common_prefix(child.tokens, tokens[i:])
            child.last_use = now
            if common < len(child.tokens):
                return child, i + common      # the match ends inside child's edge
            node, i = child, i + common
        return node, i

    def _split_at(self, node: _Node, matched: int) -> _Node:
        """Make the matched position a node boundary: split ``node``'s edge if the match ends
        inside it. Returns the node whose path is exactly the matched prefix."""
        depth = self._depth(node)
        if depth == matched:
            return node
        keep = len(node.tokens) - (depth - matched)          # tokens of the edge that match
        parent = node.parent
        head = _Node(node.tokens[:keep], parent, last_use=node.last_use)
        parent.children[head.tokens[0]] = head
        node.tokens = node.tokens[keep:]
        node.parent = head
        head.children[node.tokens[0]] = node
        return head

    def _depth(self, node: _Node) -> int:
        depth = 0
        while node is not None:
            depth += len(node.tokens)
            node = node.parent
        return depth

    @staticmethod
    def _path(node: _Node) -> set[int]:
        ids = set()
        while node is not None:
            ids.add(id(node))
            node = node.parent
        return ids

    def _evict(self, tokens_needed: int, protected: set[int]) -> None:
        """Drop least recently used leaves (never one on the ``protected`` path) until
        ``tokens_needed`` tokens are freed."""
        while tokens_needed > 0:
            leaves = [n for n in self._nodes() if not n.children and id(n) not in protected]
            if not leaves:
                raise RuntimeError("prefix cache: nothing left to evict")
            leaf = min(leaves, key=lambda n: n.last_use)
            del leaf.parent.children[leaf.tokens[0]]
            self.size -= len(leaf.tokens)
            self.evicted += len(leaf.tokens)
            tokens_needed -= len(leaf.tokens)

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def sequences(self) -> list[tuple[int, ...]]:
        """Every root-to-leaf path: the longest cached sequences."""
        out = []

        def visit(node: _Node, prefix: tuple[int, ...]) -> None:
            prefix = prefix + node.tokens
            if not node.children and node is not self.root:
                out.append(prefix)
            for child in node.children.values():
                visit(child, prefix)

        visit(self.root, ())
        return sorted(out)

    def check(self) -> None:
        """Assert the tree's invariants: edges non-empty and keyed by their first token,
        parents consistent, size equal to the tokens on the edges, within capacity."""
        total = 0
        for node in self._nodes():
            assert node.tokens, "a non-root node with an empty edge"
            assert node.parent.children.get(node.tokens[0]) is node, "child keyed wrongly"
            total += len(node.tokens)
        assert total == self.size, f"size {self.size} but the edges hold {total} tokens"
        assert self.capacity is None or self.size <= self.capacity, "over capacity"

    def render(self, decode: object = None, max_chars: int = 24) -> str:
        """The tree as indented text (edges decoded by ``decode(tokens)`` if given)."""
        lines = []

        def visit(node: _Node, indent: int) -> None:
            for child in sorted(node.children.values(), key=lambda n: n.tokens):
                label = decode(child.tokens) if decode else " ".join(map(str, child.tokens))
                label = label if len(label) <= max_chars else label[:max_chars - 1] + "…"
                lines.append(f"{'  ' * indent}└ {label!r} ({len(child.tokens)} tokens)")
                visit(child, indent + 1)

        visit(self.root, 0)
        return "\n".join(lines)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
