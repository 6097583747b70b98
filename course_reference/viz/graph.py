"""Computation graphs of the reference engine, drawn, and its backward pass, step by step.

``draw_graph`` lays a graph out left to right by depth (a node sits one column right of its
deepest input), ``backward_steps`` replays reverse mode one node at a time with the graph's own
``_backward`` closures (leaving the graph intact), and ``backward_explorer`` and
``backward_animation`` show those steps: the first live in JupyterLab, the second in a static
page.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from course_reference.autograd import Tensor, topological_order

_OP_COLOR = "#dbe8f6"
_LEAF_COLOR = "#dff0d8"
_CONSTANT_COLOR = "#eeeeee"
_HIGHLIGHT_COLOR = "#f7b267"
_EDGE_COLOR = "#7a7a7a"
_HIGHLIGHT_EDGE_COLOR = "#d9480f"
_BOX_WIDTH, _BOX_HEIGHT = 1.5, 0.74
_COLUMN_GAP, _ROW_GAP = 2.0, 1.0


def graph_nodes(root: Tensor) -> list[Tensor]:
    """Every tensor ``root`` was computed from, constants included, inputs before outputs.

    ``topological_order`` keeps only tensors that require grad (the ones backward visits); a
    drawing also shows the constants an op consumed.
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in reversed(node._parents) if id(p) not in visited)
    return order


def _columns(nodes: list[Tensor]) -> dict[int, int]:
    """Column of each node: ops one right of their deepest input, leaves just left of their
    first consumer (so a weight used late in the graph is drawn next to its use)."""
    column: dict[int, int] = {}
    for node in nodes:
        column[id(node)] = 1 + max((column[id(p)] for p in node._parents), default=-1)
    consumers: dict[int, list[int]] = {}
    for node in nodes:
        for p in node._parents:
            consumers.setdefault(id(p), []).append(column[id(node)])
    for node in nodes:
        if not node._parents and id(node) in consumers:
            column[id(node)] = min(consumers[id(node)]) - 1
    return column


def _layout(nodes: list[Tensor]) -> dict[int, tuple[float, float]]:
    """Positions: columns by depth, rows ordered by a few barycentre sweeps to limit crossings."""
    column = _columns(nodes)
    by_column: dict[int, list[Tensor]] = {}
    for node in nodes:
        by_column.setdefault(column[id(node)], []).append(node)
    neighbours: dict[int, list[int]] = {id(n): [] for n in nodes}
    for node in nodes:
        for p in node._parents:
            neighbours[id(node)].append(id(p))
            neighbours[id(p)].append(id(node))

    y: dict[int, float] = {}

    def place(members: list[Tensor]) -> None:
        top = (len(members) - 1) / 2
        for row, member in enumerate(members):
            y[id(member)] = (top - row) * _ROW_GAP

    for members in by_column.values():
        place(members)
    for _ in range(3):
        for c in sorted(by_column):
            members = by_column[c]
            members.sort(key=lambda n: -np.mean([y[k] for k in neighbours[id(n)]] or [y[id(n)]]))
            place(members)
    return {id(n): (column[id(n)] * _COLUMN_GAP, y[id(n)]) for n in nodes}


def _shape_text(shape: tuple[int, ...]) -> str:
    return "scalar" if shape == () else str(tuple(shape))


def _label(node: Tensor, wrap: bool = False) -> str:
    if node._op and node.name:
        joined = f"{node.name} = {node._op}"
        return joined if len(joined) <= 17 or not wrap else f"{node.name} =\n{node._op}"
    if node._op:
        return node._op
    if node.name:
        return node.name
    return "input" if node.requires_grad else "const"


def _grad_text(grad: np.ndarray) -> str:
    grad = np.asarray(grad)
    if grad.size == 1:
        return f"g = {grad.item():.3g}"
    if grad.size <= 2:
        return "g = [" + ", ".join(f"{v:.2g}" for v in grad.ravel()) + "]"
    return f"|g| = {np.linalg.norm(grad):.3g}"


def draw_graph(root: Tensor, ax: Axes | None = None, highlight: Tensor | None = None,
               grads: Mapping[int, np.ndarray] | None = None) -> Axes:
    """Draw the computation graph that produced ``root``, inputs on the left.

    Each node is one box labelled with its op (or name) and shape; leaves that require grad are
    green, constants grey, ops blue. ``highlight`` (a tensor of the graph) is drawn in orange
    with the edges to its inputs, the ones its gradient flows back along. ``grads`` maps
    ``id(tensor)`` to a gradient to print in the box (``known_gradients`` builds one).
    """
    nodes = graph_nodes(root)
    positions = _layout(nodes)
    if ax is None:
        _, ax = plt.subplots(figsize=_figure_size(positions))
    grads = grads or {}
    highlighted = id(highlight) if highlight is not None else None

    for node in nodes:
        x, y = positions[id(node)]
        seen: dict[int, int] = {}
        for parent in node._parents:
            repeat = seen.get(id(parent), 0)
            seen[id(parent)] = repeat + 1
            px, py = positions[id(parent)]
            hot = id(node) == highlighted
            # x * x: two edges between the same pair of nodes, bent apart; an edge that skips
            # columns bends away from the boxes it would otherwise cross.
            bend = 0.25 * repeat
            if x - px > _COLUMN_GAP * 1.5:
                bend += 0.3 if py <= y else -0.3
            ax.annotate(
                "", xy=(x - _BOX_WIDTH / 2, y), xytext=(px + _BOX_WIDTH / 2, py),
                arrowprops={
                    "arrowstyle": "-|>", "shrinkA": 0, "shrinkB": 0, "mutation_scale": 10,
                    "color": _HIGHLIGHT_EDGE_COLOR if hot else _EDGE_COLOR,
                    "linewidth": 2.0 if hot else 1.0,
                    "connectionstyle": f"arc3,rad={bend}",
                },
                zorder=1)

    for index, node in enumerate(nodes):
        x, y = positions[id(node)]
        if id(node) == highlighted:
            face = _HIGHLIGHT_COLOR
        elif node._op:
            face = _OP_COLOR
        else:
            face = _LEAF_COLOR if node.requires_grad else _CONSTANT_COLOR
        box = FancyBboxPatch(
            (x - _BOX_WIDTH / 2, y - _BOX_HEIGHT / 2), _BOX_WIDTH, _BOX_HEIGHT,
            boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face,
            edgecolor=_HIGHLIGHT_EDGE_COLOR if id(node) == highlighted else "#4a4a4a",
            linewidth=2.0 if id(node) == highlighted else 0.8,
            linestyle="--" if not node.requires_grad else "-", zorder=2,
            gid=f"node-{index}")
        ax.add_patch(box)
        lines = [_label(node, wrap=True), _shape_text(node.shape)]
        if id(node) in grads:
            lines.append(_grad_text(grads[id(node)]))
        ax.text(x, y, "\n".join(lines), ha="center", va="center", fontsize=7.5, zorder=3,
                linespacing=1.25)

    xs = [x for x, _ in positions.values()]
    ys = [y for _, y in positions.values()]
    ax.set_xlim(min(xs) - _BOX_WIDTH, max(xs) + _BOX_WIDTH)
    ax.set_ylim(min(ys) - _BOX_HEIGHT, max(ys) + _BOX_HEIGHT)
    ax.set_axis_off()
    return ax


@dataclass(frozen=True)
class BackwardStep:
    """One node's turn in the backward pass.

    ``grad`` is the whole gradient of the root with respect to ``node`` (every contribution
    has arrived when its turn comes); ``sent`` pairs each input that requires grad with the
    gradient ``node._backward`` sent it.
    """

    node: Tensor
    grad: np.ndarray
    sent: tuple[tuple[Tensor, np.ndarray], ...]

    def describe(self) -> str:
        received = f"{_label(self.node)} {_shape_text(self.node.shape)} has its gradient " \
                   f"({_grad_text(self.grad)})"
        if not self.sent:
            return f"{received}; it is a leaf: this is its .grad"
        targets = ", ".join(f"{_label(p)} ({_grad_text(g)})" for p, g in self.sent)
        return f"{received} and sends to {targets}"


def backward_steps(root: Tensor, grad: np.ndarray | None = None) -> list[BackwardStep]:
    """Reverse mode one node at a time, with the graph's own ``_backward`` closures.

    The same walk as ``course_reference.autograd.backward`` (reverse topological order, gradients
    of a tensor used several times summed before its turn), but it records every step and frees
    nothing, so the graph can be drawn, replayed, and differentiated again afterwards.
    """
    if not root.requires_grad:
        raise RuntimeError(f"backward_steps: the root (shape {root.shape}) does not require grad")
    if grad is None:
        if root.size != 1:
            raise RuntimeError(f"backward_steps: the root has shape {root.shape}; pass the "
                               "gradient to start from for a non-scalar root")
        grad = np.ones_like(root.data)
    elif np.shape(grad) != root.shape:
        raise ValueError(f"backward_steps: a gradient of shape {np.shape(grad)} was given for a "
                         f"root of shape {root.shape}")
    pending: dict[int, np.ndarray] = {id(root): np.asarray(grad, dtype=root.dtype)}
    steps: list[BackwardStep] = []
    for node in reversed(topological_order(root)):
        g = pending.pop(id(node), None)
        if g is None:
            continue
        if node._freed:
            raise RuntimeError(f"backward_steps: the graph was freed by an earlier backward() (at "
                               f"a '{node._op}' of shape {node.shape}); build it again, or call "
                               "backward(retain_graph=True)")
        sent: list[tuple[Tensor, np.ndarray]] = []
        if node._parents:
            for parent, parent_grad in zip(node._parents, node._backward(g)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                sent.append((parent, parent_grad))
                previous = pending.get(id(parent))
                pending[id(parent)] = parent_grad if previous is None else previous + parent_grad
        steps.append(BackwardStep(node, g, tuple(sent)))
    return steps


def known_gradients(steps: list[BackwardStep], upto: int) -> dict[int, np.ndarray]:
    """What is known once steps ``0..upto`` have run: each visited node's gradient, and the sum
    of what has arrived so far at nodes still waiting for their turn (keyed by ``id``)."""
    known: dict[int, np.ndarray] = {}
    if not steps:
        return known
    known[id(steps[0].node)] = steps[0].grad
    for step in steps[: upto + 1]:
        for parent, g in step.sent:
            previous = known.get(id(parent))
            known[id(parent)] = g if previous is None else previous + g
    return known


def _figure_size(positions: Mapping[int, tuple[float, float]]) -> tuple[float, float]:
    columns = {x for x, _ in positions.values()}
    rows = max(sum(1 for x2, _ in positions.values() if x2 == x) for x in columns)
    return 1.8 * len(columns) + 0.6, 0.95 * rows + 0.6


def _step_figure(root: Tensor, dpi: int) -> tuple[Figure, Axes]:
    """A figure outside pyplot (nothing is shown twice in a notebook), sized for the graph."""
    width, height = _figure_size(_layout(graph_nodes(root)))
    figure = Figure(figsize=(width, height + 0.4), dpi=dpi)
    return figure, figure.add_subplot()


def _draw_step(ax: Axes, root: Tensor, steps: list[BackwardStep], index: int) -> None:
    ax.clear()
    draw_graph(root, ax=ax, highlight=steps[index].node, grads=known_gradients(steps, index))
    ax.set_title(f"backward, step {index + 1} of {len(steps)}: {_label(steps[index].node)}",
                 fontsize=9)


class BackwardExplorer(widgets.VBox):
    """Step through a backward pass: previous and next buttons, a slider, the graph redrawn
    with the current node highlighted and every gradient known so far."""

    def __init__(self, root: Tensor, dpi: int = 90):
        steps = backward_steps(root)
        slider = widgets.IntSlider(value=0, min=0, max=len(steps) - 1, description="step",
                                   continuous_update=False)
        previous_button = widgets.Button(description="previous", icon="arrow-left")
        next_button = widgets.Button(description="next", icon="arrow-right")
        caption = widgets.HTML()
        image = widgets.Image(format="png")
        super().__init__(children=[widgets.HBox([previous_button, slider, next_button]), caption,
                                   image])
        self.root, self.steps, self.dpi = root, steps, dpi
        self.slider, self.caption, self.image = slider, caption, image
        self.previous_button, self.next_button = previous_button, next_button
        self._figure, self._ax = _step_figure(root, dpi)
        previous_button.on_click(lambda _: self.previous())
        next_button.on_click(lambda _: self.next())
        slider.observe(lambda _: self._render(), names="value")
        self._render()

    @property
    def step(self) -> int:
        return self.slider.value

    def next(self) -> None:
        self.slider.value = min(self.slider.value + 1, self.slider.max)

    def previous(self) -> None:
        self.slider.value = max(self.slider.value - 1, 0)

    def _render(self) -> None:
        index = self.slider.value
        _draw_step(self._ax, self.root, self.steps, index)
        buffer = io.BytesIO()
        self._figure.savefig(buffer, format="png", dpi=self.dpi, bbox_inches="tight")
        self.image.value = buffer.getvalue()
        self.caption.value = (f"<b>step {index + 1} of {len(self.steps)}</b>: "
                              f"{html.escape(self.steps[index].describe())}")


def backward_explorer(root: Tensor) -> BackwardExplorer:
    """An ipywidgets explorer of ``backward_steps(root)``; it needs a live kernel (JupyterLab)."""
    return BackwardExplorer(root)


def backward_animation(root: Tensor, interval: int = 1200, dpi: int = 80) -> Any:
    """The steps of ``backward_steps(root)`` as a self-contained JavaScript animation (HTML),
    for pages without a kernel: one frame per step, with play, pause and step controls."""
    from IPython.display import HTML
    from matplotlib.animation import FuncAnimation

    steps = backward_steps(root)
    figure, ax = _step_figure(root, dpi)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9)
    animation = FuncAnimation(figure, lambda i: _draw_step(ax, root, steps, i),
                              frames=len(steps), interval=interval, repeat=False)
    return HTML(animation.to_jshtml(default_mode="once"))
