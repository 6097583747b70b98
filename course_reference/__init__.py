"""AI Systems, hands-on: the reference implementation, the course's answer key.

Every lab's complete answer (autograd, ZeRO, the pipeline executor, the paged cache, speculative
decoding) and the systems of Parts III and IV. The book, the benchmarks and the hidden checks use
it; a student notebook never imports it, and it ships only inside autograder zips.
"""
