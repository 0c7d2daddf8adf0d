"""Names of a job's life, shared by every layer: states, terminal states and running phases.

Part of the public contract (the API reports them, the client waits for them, the database
stores them, the worker produces them); defined once here. Imports nothing.
"""

from __future__ import annotations

#: Every state a job can be in, in lifecycle order (`cancelling`: a running job winding down).
JOB_STATES: tuple[str, ...] = (
    "queued",
    "running",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
)
#: States a job never leaves.
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
#: Phases of a running job, in the order the pipeline runs them.
PHASES: tuple[str, ...] = (
    "loading",
    "baseline",
    "profiling",
    "training",
    "exporting",
    "finetuning",
    "evaluating",
    "packaging",
)
