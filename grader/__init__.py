"""The course's grading tooling: assign labs, grade batches without containers, check for leaks."""
