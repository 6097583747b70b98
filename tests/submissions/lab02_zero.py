"""Curated buggy submissions for Lab 2: the mistakes students make, and the points they cost."""

from .mutations import cheat, cheats_for, mutation

ZERO1_REDUCE = '''        mine = torch.empty_like(unit.shard)
        comm.reduce_scatter(mine, flat)
        unit.shard.grad = mine / self.world_size
        # END SOLUTION
'''

MUTATIONS = [
    mutation(
        "gradients_not_averaged",
        "reduce-scatters the gradients but never divides by N: each rank's shard holds the sum",
        [(ZERO1_REDUCE, ZERO1_REDUCE.replace("mine / self.world_size", "mine"))],
        breaks={"q2", "q3"}, may_break={"q6"}),
    mutation(
        "all_reduce_instead_of_reduce_scatter",
        "all-reduces the whole gradient and keeps a slice: right numbers, 3Ψ of traffic",
        [(ZERO1_REDUCE, '''        comm.all_reduce(flat)
        start, end = shard_range(unit.numel, self.world_size, self.rank)
        unit.shard.grad = flat[start:end] / self.world_size
        # END SOLUTION
''')],
        breaks={"q2", "q3"}, may_break={"q6"}),
    mutation(
        "full_optimizer_state_on_every_rank",
        "plain data parallelism: every rank runs AdamW over all the parameters",
        [("self.optimizer = torch.optim.AdamW([self.unit.shard], lr=lr, betas=betas,",
          "self.optimizer = torch.optim.AdamW(self.unit.params, lr=lr, betas=betas,"),
         ('''        self.reduce_gradients()
        self.optimizer.step()
        comm.all_gather(self.unit.full, self.unit.shard.detach())
''', '''        for p in self.unit.params:
            comm.all_reduce(p.grad)
            p.grad /= self.world_size
        self.optimizer.step()
''')],
        breaks={"q2", "q3"}, may_break={"q6"}),
    mutation(
        "full_gradients_kept",
        "ZeRO-2 reduce-scatters the gradients but leaves the full ones in p.grad",
        [('''        self.reduce_gradients()
        for p in self.unit.params:
            p.grad = None
''', '''        self.reduce_gradients()
''')],
        breaks={"q3"}),
    mutation(
        "gathered_parameters_never_freed",
        "ZeRO-3 gathers parameters but never frees them (and so never gathers the update)",
        [("        unit.full.untyped_storage().resize_(0)\n", "        pass\n")],
        breaks={"q4"}),
    mutation(
        "padding_adds_a_chunk_when_even",
        "pads with a whole extra chunk when the size already divides evenly",
        [("    return -(-numel // world_size) * world_size\n",
          "    return (numel // world_size + 1) * world_size\n")],
        breaks={"q1"}, may_break={"q2", "q3", "q4", "q6"}),
    mutation(
        "shard_offset_ignores_padding",
        "places shard r at r * (numel // N), the unpadded split, so shards overlap",
        [("    return rank * shard, (rank + 1) * shard\n",
          "    start = rank * (numel // world_size)\n    return start, start + shard\n")],
        breaks={"q1"}, may_break={"q2", "q3", "q4", "q6"}),
]

# Operator mutants of the solution that compute what the lab asks for (grader/mutation.py):
# they leave the mutation score's denominator, each with the reason.
_GUARD = ("the solution never gathers a unit that is already whole (every gather follows a "
          "free), so this early return is a guard that never fires")
EQUIVALENT = {
    "Zero3.gather: drop statement: return": _GUARD,
    "Zero3.gather: drop statement: if unit.is_gathered(): return": _GUARD,
}


# Submissions that try to earn points without the work, each one cell; graded with the
# submission in a process of its own (grader/isolated.py), none earns a point.
SETUP = "from course_runtime.distributed.data_parallel import mlp, speed_table"

CHEATS = [
    *cheats_for("lab02_zero", SETUP, "course_reference/parallel/*.py",
                "def unflatten(flat, shapes):",
                ["padded_size(numel, world_size)", "shard_range(numel, world_size, rank)"],
                "course_reference/parallel"),
    cheat("reference_kept_alive",
          "imports the reference ZeRO under a name built from strings and re-installs it as the "
          "lab's classes and functions after every cell with an IPython post_run_cell hook",
          '''import importlib
zero = importlib.import_module("course_" + "reference" + ".parallel.zero")
memory = importlib.import_module("course_" + "reference" + ".parallel.memory")

def stage(n):
    def make(model, lr, weight_decay=0.0, betas=(0.9, 0.999)):
        return zero.ZeroAdamW(model, stage=n, lr=lr, weight_decay=weight_decay)
    return make

def reinstall(*args):
    globals().update(Zero1=stage(1), Zero2=stage(2), Zero3=stage(3),
                     padded_size=zero.padded_numel, shard_range=zero.shard_bounds,
                     theory_traffic=lambda psi, n, s: memory.comm_volume(psi, n, s,
                                                                         element_bytes=4))

get_ipython().events.register("post_run_cell", reinstall)
reinstall()
''', after=SETUP),
]
