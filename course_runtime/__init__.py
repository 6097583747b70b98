"""AI Systems, hands-on: the runtime students install and import.

Everything a lab gives you lives here: the process launcher and counted collectives
(``distributed``), the tiny GPTs with their weights and corpus (``models``), small data sets
(``data``), the pipeline lab's schedule vocabulary, model stages and timing harness
(``pipeline``), the serving labs' requests, block tables and static-batching baseline
(``serving``), the device choice (``device``), the timing harness (``timing``), the helpers public
tests use (``testing``), and plots and widgets (``viz``). The course's answer key is not part of
it: the labs are graded against a reference implementation that students never receive.
"""
