"""How the training runner starts, follows and stops one training: the executor interface.

The runner (``sfumato worker --queue trainings``) claims a training record and hands it to an
executor, which runs ``sfumato training run --id TRAINING_ID`` somewhere: as a local subprocess,
or as a Kubernetes Job (:mod:`sfumato.control_plane.kubernetes_executor`,
``SFUMATO_TRAINING_EXECUTOR=kubernetes``). The training itself reads its data set from the object
store, writes checkpoints and weights there and updates its record; the executor only reports
where the process stands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

ExecutorState = Literal["pending", "running", "succeeded", "failed"]


@dataclass(frozen=True, slots=True)
class ExecutorStatus:
    """Where one started training stands; ``message`` says why when it failed (or waits)."""

    state: ExecutorState
    message: str = ""


class TrainingExecutor(Protocol):
    async def start(self, *, training_id: str) -> str:
        """Start ``sfumato training run --id training_id``; returns a handle for the calls below.
        Starting the same training twice (a runner that restarted) must not run it twice."""
        ...

    async def poll(self, handle: str) -> ExecutorStatus: ...

    async def cancel(self, handle: str) -> None:
        """Stop the training and everything it started; cancelling what is gone is no error."""
        ...
