"""Curated buggy submissions for Lab 3: the mistakes students make, and the points they cost."""

from .mutations import cheat, cheats_for, mutation

MUTATIONS = [
    mutation(
        "steady_state_sends_first",
        "1F1B's steady state sends the activation before receiving the gradient: both "
        "neighbours send first and, with blocking sends, wait for each other forever",
        [('actions += [Action("recv_bwd", k), Action("send_fwd", i)] if s < last else []',
          'actions += [Action("send_fwd", i), Action("recv_bwd", k)] if s < last else []')],
        breaks={"q2"}),
    mutation(
        "gpipe_backward_before_forward",
        "GPipe's two loops in the wrong order: every backward before its forward",
        [("        for i in range(num_microbatches):\n            if s > 0:\n"
          "                actions.append(Action(\"recv_fwd\", i))",
          "        for i in []:\n            if s > 0:\n"
          "                actions.append(Action(\"recv_fwd\", i))"),
         ("            if s > 0:\n                actions.append(Action(\"send_bwd\", i))\n"
          "        schedule.append(actions)",
          "            if s > 0:\n                actions.append(Action(\"send_bwd\", i))\n"
          "        for i in range(num_microbatches):\n"
          "            actions += [Action(\"recv_fwd\", i)] if s > 0 else []\n"
          "            actions.append(Action(\"F\", i))\n"
          "            actions += [Action(\"send_fwd\", i)] if s < last else []\n"
          "        schedule.append(actions)")],
        breaks={"q1"}),
    mutation(
        "one_f_one_b_with_gpipe_memory",
        "a \"1F1B\" whose warm-up runs every forward: valid, but it holds m activations",
        [("warmup = min(num_stages - 1 - s, num_microbatches)", "warmup = num_microbatches")],
        breaks={"q2"}),
    mutation(
        "warmup_off_by_one",
        "p - s warm-up forwards instead of p - 1 - s: stage 0 holds p + 1 activations",
        [("warmup = min(num_stages - 1 - s, num_microbatches)",
          "warmup = min(num_stages - s, num_microbatches)")],
        breaks={"q2"}),
    mutation(
        "cool_down_misses_a_backward",
        "the cool-down stops one backward short",
        [("for k in range(num_microbatches - warmup, num_microbatches):",
          "for k in range(num_microbatches - warmup, num_microbatches - 1):")],
        breaks={"q2"}),
    mutation(
        "send_names_the_next_microbatch",
        "GPipe sends each activation under the next microbatch's index",
        [("            if s < last:\n                actions.append(Action(\"send_fwd\", i))",
          "            if s < last:\n                actions.append(Action(\"send_fwd\", i + 1))")],
        breaks={"q1"}),
    mutation(
        "sends_never_block",
        "find_deadlock lets a send through without its receive, as if sends were buffered",
        [("            if heads[peer] < len(plan[peer]) and plan[peer][heads[peer]] == partner:\n"
          "                heads[s] += 1\n                heads[peer] += 1\n"
          "                moved = True\n    return {s: plan[s][heads[s]]",
          "            if plan[s][heads[s]].op.startswith(\"send\"):\n"
          "                heads[s] += 1\n                moved = True\n"
          "            elif heads[peer] < len(plan[peer]) and plan[peer][heads[peer]] == partner:\n"
          "                heads[s] += 1\n                heads[peer] += 1\n"
          "                moved = True\n    return {s: plan[s][heads[s]]")],
        breaks={"q3"}),
    mutation(
        "bubble_over_busy_time",
        "the bubble divided by the busy time instead of the whole span of every stage",
        [("    return 1.0 - busy / (num_stages * span)",
          "    return (num_stages * span - busy) / busy")],
        breaks={"q4"}),
    mutation(
        "loss_not_divided_by_m",
        "each microbatch's loss is backpropagated whole: gradients m times too large",
        [("outputs[i] = loss_fn(out, targets[i]) / m if rank == last else out",
          "outputs[i] = loss_fn(out, targets[i]) if rank == last else out")],
        breaks={"q5"}, may_break={"q6"}),
    mutation(
        "gradients_not_accumulated",
        "gradients zeroed before every backward: only the last microbatch's remain",
        [("            outputs.pop(i).backward(grads.pop(i) if rank < last else None)",
          "            stage.zero_grad()\n"
          "            outputs.pop(i).backward(grads.pop(i) if rank < last else None)")],
        breaks={"q5"}, may_break={"q6"}),
]

# Operator mutants of the solution that compute what the lab asks for (grader/mutation.py):
# they leave the mutation score's denominator, each with the reason.
EQUIVALENT = {
    "pipeline_worker: swap arguments: loss_fn(out, targets[i])":
        "the lab's loss, the mean squared error, is symmetric in its two arguments",
    "pipeline_worker: 0 -> -1: 0 #2":
        "the buffer for a received activation is shaped like microbatches[-1] instead of "
        "microbatches[0]: the microbatches of a batch all have one shape",
    "pipeline_worker: 0 -> -1: 0 #4":
        "the buffer for a received gradient is shaped like microbatches[-1] instead of "
        "microbatches[0]: the microbatches of a batch all have one shape",
    "one_f_one_b_schedule: swap arguments: min(num_stages - 1 - s, num_microbatches)":
        "min is symmetric",
    "one_f_one_b_schedule: < -> <=: s < last":
        "the warm-up's send: on the last stage the warm-up runs min(0, m) = 0 forwards, so "
        "s <= last and s < last agree on every stage that reaches it",
    "one_f_one_b_schedule: < -> <=: s < last #3":
        "the cool-down's receive: on the last stage the cool-down is range(m, m), empty, so "
        "s <= last and s < last agree on every stage that reaches it",
    "find_deadlock: drop statement: moved = True #2":
        "a round in which only computes ran leaves every stage at a send, a receive or its "
        "end, and each such stage was compared with its peer's final position in that round "
        "(the later of the two in the round sees both): nothing more can move, so stopping "
        "there is right",
    "simulate: drop statement: moved = True #2":
        "as for find_deadlock: after a round in which only computes ran nothing more can move",
    "simulate: < -> <=: heads[peer] < len(plan[peer])":
        "simulate is given schedules that finish (the lab simulates schedules that validate): "
        "in one, no stage ever waits at a send or receive whose peer has reached its end, so "
        "the peer's position is never len(plan[peer]) there",
    "simulate: swap arguments: max(clocks[s], clocks[peer])":
        "max is symmetric",
    "peak_in_flight: swap arguments: max(peak, held)":
        "max is symmetric",
}


# Submissions that try to earn points without the work, each one cell; graded with the
# submission in a process of its own (grader/isolated.py), none earns a point.
SETUP = "from course_runtime.viz import plot_gantt"

CHEATS = [
    *cheats_for("lab03_pipeline", SETUP, "course_reference/parallel/pipeline/*.py",
                "def gpipe_schedule(num_stages, num_microbatches):",
                ["gpipe_schedule(num_stages, num_microbatches)"],
                "course_reference/parallel/pipeline"),
    cheat("reference_kept_alive",
          "imports the reference pipeline under a name built from strings and re-installs its "
          "schedules, deadlock check, simulator and executor after every cell with an IPython "
          "post_run_cell hook",
          '''import importlib
pipe = importlib.import_module("course_" + "reference" + ".parallel.pipeline")

def simulate_events(schedule, forward_cost, backward_cost):
    return [(e.stage, e.op, e.microbatch, e.start, e.end)
            for e in pipe.simulate(schedule, forward_cost, backward_cost).events]

def reinstall(*args):
    globals().update(
        gpipe_schedule=pipe.gpipe_schedule, one_f_one_b_schedule=pipe.one_f_one_b_schedule,
        find_deadlock=lambda s: {r: a for r, (_, a) in pipe.find_deadlock(s).items()},
        simulate=simulate_events, peak_in_flight=pipe.peak_in_flight,
        pipeline_worker=pipe.pipeline_worker)

get_ipython().events.register("post_run_cell", reinstall)
reinstall()
''', after=SETUP),
]
