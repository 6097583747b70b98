"""Pipeline parallelism, the reference: schedules as plain data, a validator, a simulator and an
executor, cut by concept.

A schedule is a list per stage (one stage per rank) of ``Action``s, run in order:

    F(i) / B(i)               forward / backward of microbatch i on this stage
    send_fwd(i) / recv_fwd(i) the activation of microbatch i, to the next stage / from the previous
    send_bwd(i) / recv_bwd(i) the gradient of that activation, to the previous / from the next

The vocabulary (``Action``, ``peer_of``, ``model_stage``, ``bubble_formula``) and the check of a
schedule's form (``structure_problems``) are the runtime's, ``course_runtime.pipeline``, which the
lab gives; the rest is here:

- ``schedules``: GPipe, 1F1B, interleaved 1F1B (``add_communication`` places the transfers of a
  compute order deadlock-free);
- ``order``: the one loop that runs a schedule as far as it goes, every stage advancing while its
  next action can run, a send matched with its receive (blocking or buffered);
- ``validation``: ``find_deadlock``, ``schedule_problems`` (form, then a deadlock under blocking
  sends) and ``validate``;
- ``simulation``: ``simulate`` (a ``Timeline`` of ``Event``s, blocking or buffered sends),
  ``peak_in_flight``;
- ``executor``: ``StageRunner`` and ``pipeline_worker`` (non-blocking ``irecv``/``isend``, so a
  send never stalls a stage), ``run_pipeline`` on forked ranks.

Everything is re-exported here, so that ``from course_reference.parallel import pipeline as
ref; ref.simulate(...)`` reads as one module.
"""

from course_runtime.pipeline import (
    COMPUTE,
    OPS,
    RECVS,
    SENDS,
    Action,
    Schedule,
    ScheduleError,
    bubble_formula,
    model_stage,
    normalize,
    peer_of,
    structure_problems,
)

from .executor import PipelineResult, StageRunner, measured_timeline, pipeline_worker, run_pipeline
from .order import advance
from .schedules import (
    add_communication,
    gpipe_schedule,
    interleaved_compute_order,
    interleaved_schedule,
    one_f_one_b_schedule,
)
from .simulation import Event, Timeline, peak_in_flight, simulate
from .validation import find_deadlock, schedule_problems, validate

__all__ = [
    "COMPUTE", "OPS", "RECVS", "SENDS", "Action", "Event", "PipelineResult", "Schedule",
    "ScheduleError", "StageRunner", "Timeline", "add_communication", "advance", "bubble_formula",
    "find_deadlock", "gpipe_schedule", "interleaved_compute_order", "interleaved_schedule",
    "measured_timeline", "model_stage", "normalize", "one_f_one_b_schedule", "peak_in_flight",
    "peer_of", "pipeline_worker", "run_pipeline", "schedule_problems", "simulate",
    "structure_problems", "validate",
]
