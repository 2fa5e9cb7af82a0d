"""The scheduler's wait queue, shared across clients: each client's jobs wait in arrival order,
and clients take turns. Not thread-safe: the scheduler calls it under its lock.

Why: first come first served let one client's burst take every place (19 requests of one
conversation took 18 of 2 + 16) so that the next device got `busy` at once and waited behind
all of them. Here a freed slot goes to the next client in turn among those holding the fewest
slots, a client holds at most `max_per_client` waiting places, and a full queue gives a
newcomer the newest place of the client holding the most (docs/protocol.md, "Fair shares").
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from typing import Generic, Protocol, TypeVar


class Waiting(Protocol):
    @property
    def client_id(self) -> str: ...
    @property
    def ready(self) -> bool: ...  # a slot may take it (its grammar, if any, is compiled)
    @property
    def cancelled(self) -> bool: ...


J = TypeVar("J", bound=Waiting)


class WaitQueue(Generic[J]):
    def __init__(self, max_per_client: int) -> None:
        self._max_per_client = max_per_client  # 0: any
        # Each client's waiting jobs, oldest first; clients in turn order (next to serve first).
        self._clients: OrderedDict[str, deque[J]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def has_share(self, client_id: str) -> bool:
        """Whether the client may queue one more job."""
        jobs = self._clients.get(client_id)
        return not self._max_per_client or jobs is None or len(jobs) < self._max_per_client

    def add(self, job: J) -> None:
        # A client new to the queue joins the end of the turn order.
        self._clients.setdefault(job.client_id, deque()).append(job)
        self._count += 1

    def remove(self, job: J) -> bool:
        """Take a job off the queue; False if it is not waiting (any more)."""
        jobs = self._clients.get(job.client_id)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self._forget_if_empty(job.client_id)
        return True

    def displace(self, client_id: str, holding: Mapping[str, int]) -> J | None:
        """The queue is full: the newest waiting job of the client holding the most places
        (waiting and in slots: `holding`), taken off the queue, if that is at least two more
        than `client_id` holds (else moving one place would only swap who is short)."""
        places = Counter(holding)
        for client, jobs in self._clients.items():
            places[client] += len(jobs)
        most = max(self._clients, key=places.__getitem__, default=None)
        if most is None or places[most] < places[client_id] + 2:
            return None
        victim = self._clients[most].pop()
        self._forget_if_empty(most)
        return victim

    def any_ready(self) -> bool:
        """Whether a slot could take a job now (else what waits, waits for its grammar)."""
        return any(jobs[0].ready or jobs[0].cancelled for jobs in self._clients.values())

    def next(self, holding: Mapping[str, int], *, any_job: bool = False) -> J | None:
        """The oldest waiting job of the next client in turn among those holding the fewest
        slots (`holding`); a job still waiting for its grammar holds back only its own client,
        whose jobs keep their order. `any_job`: readiness aside (a stopping node ends them)."""
        best: str | None = None
        fewest = 0
        for client, jobs in self._clients.items():
            head = jobs[0]
            if not (head.ready or head.cancelled or any_job):
                continue
            held = holding.get(client, 0)
            if best is None or held < fewest:
                best, fewest = client, held
                if not held:
                    break
        if best is None:
            return None
        job = self._clients[best].popleft()
        if not self._forget_if_empty(best):
            self._clients.move_to_end(best)  # its turn is over
        return job

    def _forget_if_empty(self, client_id: str) -> bool:
        self._count -= 1
        if self._clients[client_id]:
            return False
        del self._clients[client_id]
        return True
