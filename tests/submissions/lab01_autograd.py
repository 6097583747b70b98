"""Curated buggy submissions for Lab 1: the mistakes students make, and the points they cost."""

from .mutations import cheat, cheats_for, mutation

RECURSIVE_ORDER = '''def topological_order(root):
    order, visited = [], set()

    def visit(node):
        if id(node) in visited:
            return
        visited.add(id(node))
        for parent in node._parents:
            visit(parent)
        order.append(node)

    visit(root)
    return order
'''

PREORDER = '''def topological_order(root):
    order, visited, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        order.append(node)
        stack.extend(node._parents)
    return order[::-1]
'''

SOLUTION_ORDER_HEAD = "def topological_order(root):\n    # BEGIN SOLUTION\n"
SOLUTION_ORDER_BODY = '''    order, visited, stack = [], set(), [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
        elif id(node) not in visited:
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if id(p) not in visited)
    return order
    # END SOLUTION
'''

MUTATIONS = [
    mutation(
        "unbroadcast_not_reduced",
        "returns the broadcast gradient as it is, so a bias gets a gradient of the batch's shape",
        [("    shape = tuple(shape)\n    if grad.shape == shape:\n        return grad\n",
          "    return grad\n")],
        breaks={"q1", "q2a", "q2d"}, may_break={"q2e", "q6", "q7"}),
    mutation(
        "gradient_overwritten",
        "a tensor used twice keeps only the last gradient it receives",
        [("grads[key] = parent_grad if key not in grads else grads[key] + parent_grad",
          "grads[key] = parent_grad")],
        breaks={"q3"}, may_break={"q6", "q7"}),
    mutation(
        "leaf_gradient_not_accumulated",
        "backward() overwrites .grad instead of adding to it across calls",
        [("node.grad = np.array(g) if node.grad is None else node.grad + g",
          "node.grad = np.array(g)")],
        breaks={"q3"}),
    mutation(
        "wrong_topological_order",
        "a pre-order walk, reversed: a node can come before some of its inputs",
        [(SOLUTION_ORDER_HEAD + SOLUTION_ORDER_BODY, PREORDER)],
        breaks={"q3"}, may_break={"q6", "q7"}),
    mutation(
        "recursive_topological_order",
        "a recursive walk: right on small graphs, a RecursionError on the 100,000-node chain",
        [(SOLUTION_ORDER_HEAD + SOLUTION_ORDER_BODY, RECURSIVE_ORDER)],
        breaks={"q3"}),
    mutation(
        "softmax_overflows",
        "no maximum subtracted before exp: logits in the thousands overflow float32",
        [("shifted = x.data - x.data.max(axis=axis, keepdims=True)", "shifted = x.data"),
         ("shifted = logits.data - logits.data.max(axis=1, keepdims=True)",
          "shifted = logits.data")],
        breaks={"q4"}),
    mutation(
        "adam_without_bias_correction",
        "Adam's moments are used without the 1 - beta**t correction",
        [("m_hat = m / (1 - beta1 ** self.t)", "m_hat = m"),
         ("v_hat = v / (1 - beta2 ** self.t)", "v_hat = v")],
        breaks={"q5"}, may_break={"q6"}),
    mutation(
        "backward_calls_reference_engine",
        "delegates backward() to course_reference.autograd instead of writing it",
        [(SOLUTION_ORDER_HEAD + SOLUTION_ORDER_BODY,
          "def topological_order(root):\n"
          "    from course_reference.autograd.tensor import topological_order as reference_order\n"
          "    return reference_order(root)\n")],
        breaks={"q3"}, may_break={"q6", "q7"}),
    mutation(
        "log_softmax_through_torch_autograd",
        "computes log_softmax's gradient with torch.autograd",
        [("    shifted = x.data - x.data.max(axis=axis, keepdims=True)\n"
          "    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))\n\n"
          "    def backward_fn(grad):\n"
          "        return (grad - np.exp(out) * grad.sum(axis=axis, keepdims=True),)\n",
          "    import torch\n"
          "    t = torch.tensor(x.data, requires_grad=True)\n"
          "    result = torch.log_softmax(t, dim=axis)\n"
          "    out = result.detach().numpy()\n\n"
          "    def backward_fn(grad):\n"
          "        t.grad = None\n"
          "        result.backward(torch.from_numpy(grad), retain_graph=True)\n"
          "        return (t.grad.numpy(),)\n")],
        breaks={"q4"}),
    mutation(
        "relu_in_python",
        "relu and its gradient elementwise in Python (np.vectorize): right, and far too slow",
        [("return make_node(np.maximum(x, 0), (a,), lambda grad: (np.where(x > 0, grad, 0),), "
          "\"relu\")",
          "positive = np.vectorize(lambda v: 1.0 if v > 0 else 0.0, otypes=[np.float32])(x)\n"
          "    out = np.vectorize(lambda v: v if v > 0 else 0.0, otypes=[np.float32])(x)\n"
          "    return make_node(out, (a,), lambda grad: (np.vectorize(lambda g, p: g * p, "
          "otypes=[np.float32])(grad, positive),), \"relu\")")],
        breaks={"q7"}),
    mutation(
        "backward_does_nothing",
        "backward() returns at once: no gradient anywhere, and a training step that is very "
        "fast; the speed question must not reward it",
        [("    grads = {id(root): np.asarray(grad, dtype=root.dtype)}\n",
          "    return\n    grads = {id(root): np.asarray(grad, dtype=root.dtype)}\n")],
        breaks={"q3", "q7"}, may_break={"q4", "q5", "q6"}),
    mutation(
        "max_ties_all_get_the_gradient",
        "max's backward gives the whole gradient to every tied maximum instead of sharing it",
        [("        return (mask * (grad / mask.sum(axis=axes, keepdims=True)),)",
          "        return (mask * grad,)")],
        breaks={"q2c"}, may_break={"q4", "q6", "q7"}),
]

# Operator mutants of the solution that compute what the lab asks for (grader/mutation.py):
# they leave the mutation score's denominator, each with the reason.
_NUMPY_RAISES = ("NumPy raises its own ValueError for shapes that cannot broadcast; the handout "
                 "asks the ops to broadcast, not for the wording of that error")
EQUIVALENT = {
    'mul: drop statement: broadcast_shape("mul", a.shape, b.shape)': _NUMPY_RAISES,
    'sub: drop statement: broadcast_shape("sub", a.shape, b.shape)': _NUMPY_RAISES,
    'div: drop statement: broadcast_shape("div", a.shape, b.shape)': _NUMPY_RAISES,
    'matmul: drop statement: if x.shape[-1] != y.shape[-2]: raise ValueError(f"matmul: in':
        "NumPy's matmul raises its own ValueError when the inner dimensions differ",
    'matmul: drop statement: raise ValueError(f"matmul: inner dimensions differ, {x.shape':
        "NumPy's matmul raises its own ValueError when the inner dimensions differ",
    "matmul: drop statement: a, b = as_tensor(a), as_tensor(b)":
        "matmul is only ever applied to two tensors (x @ y); the handout lets plain numbers "
        "into the elementwise ops only",
    "unbroadcast: drop statement: shape = tuple(shape)":
        "every caller passes a shape that is already a tuple (a tensor's .shape)",
    "unbroadcast: drop statement: if grad.shape == shape: return grad":
        "a shortcut: without it the general path sums over no axis and returns the same values",
    "unbroadcast: drop statement: return grad":
        "a shortcut: without it the general path sums over no axis and returns the same values",
    "unbroadcast: True -> False: True":
        "the sum is reshaped to the target shape either way, so keepdims changes nothing",
    "relu: swap arguments: np.maximum(x, 0)": "np.maximum is symmetric",
    "cross_entropy: drop statement: targets = np.asarray(targets)":
        "the lab's targets are NumPy arrays already, and lists index the same way",
}


# Submissions that try to earn points without the work, each one cell. Graded with the
# submission in a process of its own (grader/isolated.py), none earns a point on its targets;
# graded in the student's kernel, as otter does, the first three earned 50/50.
# The set-up cell of the untouched notebook, after which most cheats go.
SETUP = "from course_runtime.data import load_digits_split"

CHEATS = [
    *cheats_for("lab01_autograd", SETUP, "course_reference/autograd/*.py",
                "def unbroadcast(grad, shape):",
                ["broadcast_shape(op, *shapes)", "unbroadcast(grad, shape)"],
                "course_reference/autograd"),
    cheat("reference_kept_alive",
          "imports the reference under a name built from strings and re-installs its functions "
          "after every cell with an IPython post_run_cell hook",
          '''import importlib
source = importlib.import_module("course_" + "reference" + ".autograd")

def reinstall(*args):
    for module in (source, *(getattr(source, m) for m in ("tensor", "ops", "nn", "optim")
                             if hasattr(source, m))):
        for name in dir(module):
            if not name.startswith("__"):
                globals()[name] = getattr(module, name)

get_ipython().events.register("post_run_cell", reinstall)
reinstall()
''', after=SETUP),
    cheat("comparisons_patched",
          "makes NumPy's and PyTorch's comparisons always succeed",
          '''import numpy as np, torch
np.allclose = lambda *args, **kwargs: True
np.array_equal = lambda *args, **kwargs: True
np.testing.assert_allclose = lambda *args, **kwargs: None
np.testing.assert_array_equal = lambda *args, **kwargs: None
torch.allclose = lambda *args, **kwargs: True
torch.testing.assert_close = lambda *args, **kwargs: None
''', after=SETUP),
    cheat("always_equal",
          "every function returns an object equal to anything, with every attribute",
          '''class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __call__(self, *args, **kwargs): return self
    def __getattr__(self, name): return self
    def __iter__(self): return iter([self])
    def __len__(self): return 1
    def __float__(self): return 0.0
    def __bool__(self): return True
    __hash__ = object.__hash__

for name in ("broadcast_shape", "unbroadcast", "add", "sub", "mul", "div", "neg", "power",
             "exp", "log", "relu", "tanh", "sigmoid", "sum_", "mean", "max_", "matmul",
             "reshape", "transpose", "getitem", "topological_order", "backward", "log_softmax",
             "cross_entropy", "Tensor", "make_node", "SGD", "Adam", "MLP", "Linear"):
    globals()[name] = Anything()
''', after="def backward(root, grad=None):"),
    cheat("unary_gradients_from_torch_in_a_dict",
          "computes the unary ops' gradients with torch.autograd.grad, kept in a dict so that "
          "swapping module attributes does not reach it",
          '''import torch
engine = {"grad": torch.autograd.grad}

def through_torch(function, name):
    def op(a):
        t = torch.tensor(a.data, dtype=torch.float64, requires_grad=True)
        out = function(t)

        def backward_fn(grad):
            (g,) = engine["grad"](out, t, torch.as_tensor(grad, dtype=torch.float64),
                                  retain_graph=True)
            return (g.numpy().astype(a.data.dtype),)
        return make_node(out.detach().numpy().astype(a.data.dtype), (a,), backward_fn, name)
    return op

exp, log = through_torch(torch.exp, "exp"), through_torch(torch.log, "log")
tanh, sigmoid = through_torch(torch.tanh, "tanh"), through_torch(torch.sigmoid, "sigmoid")
''', after="def sigmoid(a):", base="solution", targets={"q2b"}),
]
