"""Curated buggy submissions for Lab 4: the mistakes students make, and the points they cost."""

from .mutations import cheat, cheats_for, mutation

MUTATIONS = [
    mutation(
        "free_without_decrement",
        "free() returns a block to the free list when its count is 1 but never decrements it: a "
        "shared block stays taken forever (a leak) and counts are wrong",
        [('''        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free_list.append(block)''', '''        if self.refs[block] == 1:
            self.free_list.append(block)''')],
        breaks={"q1"}, may_break={"q4"}),
    mutation(
        "off_by_one_slot",
        "numbers the new tokens from num_tokens + 1: every token lands one slot too far",
        [("    slots = [(table.blocks[p // size], p % size) for p in range(table.num_tokens, end)]",
          "    slots = [(table.blocks[p // size], (p + 1) % size) "
          "for p in range(table.num_tokens, end)]")],
        breaks={"q2"}, may_break={"q4"}),
    mutation(
        "fork_without_copy_on_write",
        "writes into a block it shares with a fork: the other sequence's tokens change",
        [("    copy = first < len(table.blocks) and allocator.ref_count(table.blocks[first]) > 1",
          "    copy = False")],
        breaks={"q2"}, may_break={"q4"}),
    mutation(
        "logical_block_as_physical",
        "reads block j of the cache instead of the block the table maps j to",
        [("        block = block_tables[:, j]\n        k = k_cache[:, block].transpose(0, 1)",
          "        block = torch.full_like(block_tables[:, j], j)\n"
          "        k = k_cache[:, block].transpose(0, 1)")],
        breaks={"q3"}, may_break={"q4", "q6"}),
    mutation(
        "unused_slots_not_masked",
        "masks the scores of slots past the end but not their values: 0 x NaN is NaN",
        [("        v = v.masked_fill(unused[:, None, :, None], 0.0)\n", "")],
        breaks={"q3"}, may_break={"q6"}),
    mutation(
        "dense_gather_shortcut",
        "gathers every block of every sequence into one dense tensor, then a plain softmax",
        [('''    for j in range(blocks_for(int(context_lens.max()), size)):
        block = block_tables[:, j]''', '''    width = blocks_for(int(context_lens.max()), size)
    keys = k_cache[:, block_tables[:, :width]].flatten(2, 3).transpose(0, 1)
    values = v_cache[:, block_tables[:, :width]].flatten(2, 3).transpose(0, 1)
    scores = (keys @ q[..., None])[..., 0]
    unused = torch.arange(width * size) >= context_lens[:, None]
    scores = scores.masked_fill(unused[:, None], -math.inf)
    values = values.masked_fill(unused[:, None, :, None], 0.0)
    return (torch.softmax(scores, -1)[:, :, None] @ values)[:, :, 0]
    for j in range(blocks_for(int(context_lens.max()), size)):
        block = block_tables[:, j]''')],
        breaks={"q3"}, may_break={"q6"}),
    mutation(
        "decodes_one_sequence_at_a_time",
        "decodes each sequence to the end alone, one model call per token of each: the right "
        "tokens, without the batch the lab is about",
        [("""        cache.select(seqs)
        for _ in range(max_new_tokens - 1):
            logits = model(torch.tensor([[out[-1]] for out in outputs]), cache)
            for out, row in zip(outputs, logits[:, -1]):
                out.append(int(row.argmax()))""", """        for seq, out in zip(seqs, outputs):
            cache.select([seq])
            for _ in range(max_new_tokens - 1):
                logits = model(torch.tensor([[out[-1]]]), cache)
                out.append(int(logits[0, -1].argmax()))""")],
        breaks={"q4"}),
    mutation(
        "no_free_on_finish",
        "a finished request leaves the batch but keeps its blocks",
        [("        cache.free_sequence(seq)\n        reserved -= blocks_for(request.max_len, size)",
          "        reserved -= blocks_for(request.max_len, size)")],
        breaks={"q5"}, may_break={"q6"}),
    mutation(
        "admission_ignores_free_blocks",
        "admits every waiting request up to max_batch, whatever the memory: out of blocks",
        [('''                if reserved + need > capacity:
                    break
''', "")],
        breaks={"q5"}, may_break={"q6"}),
    mutation(
        "static_batching",
        "admits only when the batch is empty: static batching with extra steps",
        [("            while waiting and len(running) < max_batch:\n",
          "            while waiting and len(running) < max_batch and not any(\n"
          "                    item[2] and len(item[2]) > 1 for item in running):\n")],
        breaks={"q5", "q6"}),
    mutation(
        "waits_forever_for_a_request_that_never_fits",
        "no check that a request fits the whole cache: it waits for blocks that never come",
        [("""                if need > capacity:
                    raise ValueError(f"request {waiting[0].id} needs {need} blocks; "
                                     f"the cache has {capacity}")
""", "")],
        breaks={"q5"}),
    mutation(
        "batch_one_over_max",
        "admits while len(running) <= max_batch: one sequence more than the batch allows",
        [("while waiting and len(running) < max_batch:",
          "while waiting and len(running) <= max_batch:")],
        breaks={"q5"}, may_break={"q6"}),
    mutation(
        "dense_gather_per_sequence_and_head",
        "gathers one (sequence, head) at a time into a dense tensor of its whole context, then a "
        "plain softmax: the dense gather in a loop",
        [("    for j in range(blocks_for(int(context_lens.max()), size)):\n"
          "        block = block_tables[:, j]",
          """    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, :blocks_for(n, size)]
        for h in range(H):
            k = k_cache[h, blocks].reshape(-1, Dh)[:n]
            v = v_cache[h, blocks].reshape(-1, Dh)[:n]
            acc[b, h] = torch.softmax(k @ q[b, h], 0) @ v
    return acc
    for j in range(blocks_for(int(context_lens.max()), size)):
        block = block_tables[:, j]""")],
        breaks={"q3"}, may_break={"q6"}),
]

# Rewrites that compute what the lab asks for: each must keep every point.
REWRITES = [
    mutation(
        "blocks_through_a_transposed_view",
        "takes the cache's blocks from a transposed view of it ([blocks, heads, size, Dh]), "
        "which copies nothing",
        [("    slots = torch.arange(size)\n",
          "    slots = torch.arange(size)\n"
          "    k_blocks, v_blocks = k_cache.transpose(0, 1), v_cache.transpose(0, 1)\n"),
         ("        k = k_cache[:, block].transpose(0, 1)                  # [B, H, size, Dh]\n"
          "        v = v_cache[:, block].transpose(0, 1)\n",
          "        k, v = k_blocks[block], v_blocks[block]\n")],
        breaks=set()),
]

# Operator mutants of the solution that compute what the lab asks for (grader/mutation.py):
# they leave the mutation score's denominator, each with the reason.
EQUIVALENT = {
    "paged_decode_attention: swap arguments: v_cache[:, block].transpose(0, 1)":
        "transpose(1, 0) is transpose(0, 1)",
    "paged_decode_attention: swap arguments: k_cache[:, block].transpose(0, 1)":
        "transpose(1, 0) is transpose(0, 1)",
    "paged_decode_attention: swap arguments: torch.maximum(running_max, scores.amax(-1))":
        "torch.maximum is symmetric",
    "paged_decode_attention: 0 -> -1: 0 #3":
        "the product's last dimension has size 1 (one query per sequence): index -1 is index 0",
    "paged_decode_attention: 0 -> -1: 0 #4":
        "the product's third dimension has size 1 (one row of weights): index -1 is index 0",
    "generate_paged: 0 -> -1: 0":
        "each prompt is prefilled alone, a batch of one row: row -1 is row 0",
    "generate_paged: 1 -> 0: 1 #4":
        "a decode step feeds one token per sequence, so the logits have one position: -0 is -1",
    "serve: 0 -> -1: 0 #4":
        "each prompt is prefilled alone, a batch of one row: row -1 is row 0",
    "serve: 1 -> 0: 1 #6":
        "a decode step feeds one token per sequence, so the logits have one position: -0 is -1",
}

# The set-up cell of the untouched notebook, after which most cheats go.
SETUP = "from course_runtime.models import load, load_tokenizer"

CHEATS = [
    *cheats_for("lab04_paged_kv", SETUP, "course_reference/serving/*.py",
                "def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens):",
                ["paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens)"],
                "course_reference/serving"),
    cheat("reference_kept_alive",
          "imports the reference's allocator, cache and attention under names built from "
          "strings, and re-installs answers built on them after every cell with an IPython "
          "post_run_cell hook",
          '''import importlib
serving = "course_" + "reference" + ".serving"
allocator = importlib.import_module(serving + ".allocator")
attention = importlib.import_module(serving + ".attention")

def reinstall(*args):
    globals()["BlockAllocator"] = allocator.BlockAllocator
    globals()["paged_decode_attention"] = lambda q, k, v, tables, lens: attention.paged_attention(
        q[:, :, None], k, v, tables, lens)[:, :, 0]

get_ipython().events.register("post_run_cell", reinstall)
reinstall()
''', after=SETUP),
    cheat("private_model_decodes",
          "runs each prompt once through the model and cache it is handed, so that the model "
          "calls the grader counts look like a schedule, and decodes every token with a private "
          "copy of the shipped model, without any cache",
          '''from course_runtime.models import load as load_private

private = load_private("draft").double()

def greedy_alone(prompt, n):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(private(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]

def serve(model, requests, cache, max_batch):
    outputs = {}
    for r in requests:
        if blocks_for(r.max_len, cache.block_size) > cache.allocator.num_blocks:
            raise ValueError(f"request {r.id} can never fit")
        seq = cache.add_sequence()
        cache.select([seq])
        with torch.no_grad():
            model(torch.tensor([r.prompt]), cache)
        cache.free_sequence(seq)
        outputs[r.id] = greedy_alone(r.prompt, r.max_new_tokens)
    return outputs, len(requests)
''', after="def serve(model, requests, cache, max_batch):", base="solution",
          targets={"q5"}, partly={"q6"}),  # q6's model-call count, not its attention timing
]
