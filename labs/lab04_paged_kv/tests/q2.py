from otter.test_files import test_case

OK_FORMAT = False

name = "q2"
points = 10

@test_case(points=0, hidden=False, 
    success_message="every step of the table program returns and leaves what it should")
def test_tables_public(append_slots, fork, release, BlockAllocator):
    """A fixed program of new tables, appends, forks and releases on your BlockAllocator. Each
    step records what append_slots returned, the copy_block calls, every table, num_free and
    the reference counts, with blocks numbered in the order they first appear."""
    from course_runtime.serving import BlockTable, OutOfBlocks
    from course_runtime.testing import expected, require, time_limit
    require(append_slots=append_slots, fork=fork, release=release, BlockAllocator=BlockAllocator)
    program = expected('q2_tables')
    allocator = BlockAllocator(program['num_blocks'], program['block_size'])
    tables, names = ([], {})

    def name(block):
        return names.setdefault(int(block), len(names))
    with time_limit(10, 'your block-table functions'):
        for k, (step, want) in enumerate(zip(program['steps'], program['expected'])):
            op, returned, copies = (step['op'], None, [])
            if op == 'new':
                tables.append(BlockTable())
            elif op == 'fork':
                tables.append(fork(tables[step['table']], allocator))
            elif op == 'release':
                release(tables[step['table']], allocator)
            else:
                try:
                    slots = append_slots(tables[step['table']], allocator, step['n'], lambda src, dst: copies.append([name(src), name(dst)]))
                    assert slots is not None, f'step {k + 1} {step}: append_slots returned None, expected the list of (block, offset) of each new token'
                    returned = [[name(b), int(o)] for b, o in slots]
                except OutOfBlocks:
                    returned = 'OutOfBlocks'
            got = {'returned': returned, 'copies': copies, 'tables': [[name(b) for b in t.blocks] for t in tables], 'tokens': [t.num_tokens for t in tables], 'num_free': allocator.num_free}
            got['ref_counts'] = [allocator.ref_count(b) for b in sorted(names, key=names.get)]
            for key in want:
                assert got[key] == want[key], f"step {k + 1} {step}: {key} is {got[key]}, expected {want[key]} (this runs on your BlockAllocator: if q1's test fails, fix that first)"

