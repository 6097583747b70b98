"""The figures and widgets (course_runtime.viz, course_reference.viz): what they compute is right,
and what they draw has one mark per thing drawn."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from course_reference.autograd import MLP, Tensor, cross_entropy, topological_order
from course_reference.viz import (
    backward_animation,
    backward_explorer,
    backward_steps,
    draw_graph,
    graph_nodes,
    known_gradients,
    plot_ratios,
    results_table,
)
from course_runtime.viz import median_time, plot_op_overhead

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def graph_with_reuse() -> tuple[Tensor, list[Tensor]]:
    """b is used three times, a twice (once as x * x), and a constant joins in."""
    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((2, 3)), requires_grad=True, name="a")
    b = Tensor(rng.standard_normal(3), requires_grad=True, name="b")
    c = a * b + b
    d = (c * c).tanh() * 0.5 + a
    loss = (d * b).sum()
    return loss, [a, b]


def test_graph_nodes_lists_constants_and_is_topological():
    loss, leaves = graph_with_reuse()
    nodes = graph_nodes(loss)
    position = {id(n): i for i, n in enumerate(nodes)}
    assert nodes[-1] is loss
    assert all(position[id(p)] < position[id(n)] for n in nodes for p in n._parents)
    assert len({id(n) for n in nodes}) == len(nodes)
    constants = [n for n in nodes if not n.requires_grad]
    assert len(constants) == 1 and constants[0].item() == pytest.approx(0.5)
    assert len(nodes) == len(topological_order(loss)) + 1


def test_backward_steps_accumulate_to_what_backward_gives():
    loss, leaves = graph_with_reuse()
    steps = backward_steps(loss)
    assert [s.node for s in steps] == list(reversed(topological_order(loss)))
    known = known_gradients(steps, len(steps) - 1)
    from_steps = {id(s.node): s.grad for s in steps}
    loss.backward()  # after backward_steps: the graph must still be there
    for leaf in leaves:
        np.testing.assert_allclose(from_steps[id(leaf)], leaf.grad, rtol=1e-6)
        np.testing.assert_allclose(known[id(leaf)], leaf.grad, rtol=1e-6)
    b_step = next(s for s in steps if s.node is leaves[1])
    assert b_step.sent == ()
    senders = [s for s in steps if any(p is leaves[1] for p, _ in s.sent)]
    assert len(senders) == 3, "b is an input of three ops"


def test_backward_steps_leave_the_graph_intact_and_refuse_a_freed_one():
    loss, leaves = graph_with_reuse()
    first = backward_steps(loss)
    second = backward_steps(loss)
    for s1, s2 in zip(first, second):
        np.testing.assert_array_equal(s1.grad, s2.grad)
    loss.backward()
    with pytest.raises(RuntimeError, match="freed"):
        backward_steps(loss)


def test_known_gradients_grow_step_by_step():
    loss, _ = graph_with_reuse()
    steps = backward_steps(loss)
    sizes = [len(known_gradients(steps, i)) for i in range(len(steps))]
    assert sizes[0] >= 2 and sizes == sorted(sizes)
    assert sizes[-1] == len(steps)


def test_draw_graph_has_one_patch_per_node():
    loss, _ = graph_with_reuse()
    nodes = graph_nodes(loss)
    ax = draw_graph(loss)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert len(ax.patches) == len(nodes)
    assert {p.get_gid() for p in ax.patches} == {f"node-{i}" for i in range(len(nodes))}


def test_draw_graph_highlights_and_prints_gradients():
    loss, (a, b) = graph_with_reuse()
    steps = backward_steps(loss)
    fig, ax = plt.subplots()
    returned = draw_graph(loss, ax=ax, highlight=b, grads={id(loss): np.ones(())})
    assert returned is ax
    faces = {matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches}
    assert "#f7b267" in faces  # the highlight colour, on exactly one box
    assert sum(matplotlib.colors.to_hex(p.get_facecolor()) == "#f7b267" for p in ax.patches) == 1
    texts = [t.get_text() for t in ax.texts]
    assert sum("g = 1" in t for t in texts) == 1
    assert any("(2, 3)" in t for t in texts)
    assert steps  # the graph is still usable after drawing


def test_draw_graph_of_an_mlp_loss():
    model = MLP([4, 5, 3])
    x = Tensor(np.ones((6, 4), dtype=np.float32))
    loss = cross_entropy(model(x), np.array([0, 1, 2, 0, 1, 2]))
    ax = draw_graph(loss)
    assert len(ax.patches) == len(graph_nodes(loss)) == 11


def test_explorer_steps_and_redraws():
    loss, _ = graph_with_reuse()
    explorer = backward_explorer(loss)
    assert explorer.step == 0 and explorer.slider.max == len(explorer.steps) - 1
    image, caption = explorer.image.value, explorer.caption.value
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    explorer.next_button.click()
    assert explorer.step == 1
    assert explorer.image.value != image and explorer.caption.value != caption
    explorer.previous()
    explorer.previous()
    assert explorer.step == 0
    explorer.slider.value = explorer.slider.max
    explorer.next()
    assert explorer.step == explorer.slider.max
    assert "leaf" in explorer.caption.value


def test_animation_has_one_frame_per_step():
    a = Tensor([1.5, -0.5], requires_grad=True, name="a")
    b = Tensor([2.0, 1.0], requires_grad=True, name="b")
    loss = ((a * b + b).tanh() * a).sum()
    html = backward_animation(loss, dpi=40).data
    assert html.count("data:image/png;base64") == len(backward_steps(loss)) == 7
    assert "<script" in html


def test_median_time_and_overhead_plot():
    seconds = median_time(lambda: sum(range(100)), repeats=3, min_seconds=1e-4)
    assert 0 < seconds < 1e-2
    fig = plot_op_overhead([1, 10, 100], {"numpy": [1e-6, 1.1e-6, 2e-6], "torch": [3e-6] * 3})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2


RECORDS = [
    {"workload": "mlp step", "ours": "reference", "peer": "torch eager", "ours_s": 0.02,
     "peer_s": 0.01, "ratio": 2.0, "spread": [1.8, 2.3], "device": "cpu", "world_size": 1,
     "measured": "2026-01-01"},
    {"workload": "zero", "ours": "reference", "peer": "FSDP2", "ours_s": 0.5, "peer_s": 1.0,
     "ratio": 0.5, "spread": [0.4, 0.6], "device": "cpu", "world_size": 2,
     "measured": "2026-01-01", "bytes": 123},
    {"workload": "zero", "ours": "reference", "peer": "ZeroRedundancyOptimizer", "ours_s": 0.5,
     "peer_s": 0.6, "ratio": 0.83, "spread": [0.7, 0.9], "device": "cpu", "world_size": 2,
     "measured": "2026-01-01"},
]


def test_results_table_and_ratio_chart():
    table = results_table(RECORDS)
    assert list(table["workload"]) == ["mlp step", "zero", "zero"]
    assert table.loc[0, "ours ms"] == pytest.approx(20.0)
    assert results_table([]).empty
    fig = plot_ratios(RECORDS)
    ax = fig.axes[0]
    assert len(ax.patches) == len(RECORDS)
    assert any(line.get_xdata()[0] == 1.0 for line in ax.lines)
    with pytest.raises(ValueError, match="make bench"):
        plot_ratios([])
