"""The downstairs' dependency queue against a model: a job starts once every
job it depends on has completed (a flush or barrier completes everything
before it), never twice, and the jobs one finish frees come oldest first."""

from __future__ import annotations

import random
import uuid

import pytest

from crucible.downstairs.work import WorkQueue
from crucible.protocol import messages as m
from crucible.protocol.roles import Job

UID = uuid.UUID(int=1)
SEEDS = range(40)


def _job(rng: random.Random, jid: int, earlier: list[int]) -> m.ReadRequest | m.Barrier:
    deps = sorted(rng.sample(earlier, min(len(earlier), rng.randrange(4))))
    if rng.random() < 0.1:
        return m.Barrier(UID, UID, jid, deps)
    return m.ReadRequest(UID, UID, jid, deps, 0, 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_jobs_start_when_their_dependencies_are_complete(seed: int) -> None:
    rng = random.Random(seed)
    q = WorkQueue()
    complete: set[int] = set()  # the model: what has finished (or was reset)
    started: list[int] = []
    running: list[Job] = []
    jobs: dict[int, Job] = {}

    def starts(ready: list[Job]) -> None:
        ids = [j.job_id for j in ready]
        assert ids == sorted(ids), f"seed {seed}: freed out of order"
        for j in ready:
            assert j.job_id not in started, f"seed {seed}: {j.job_id} started twice"
            missing = [d for d in j.dependencies if d not in complete]
            assert not missing, f"seed {seed}: {j.job_id} started before {missing}"
            started.append(j.job_id)
            running.append(j)

    def finish(i: int) -> None:
        j = running.pop(i)
        complete.add(j.job_id)
        if isinstance(j, m.Barrier):
            complete.update(x for x in jobs if x < j.job_id)
        starts(q.finish(j, ok=True))

    next_id = 1000
    for _ in range(400):
        if running and rng.random() < 0.5:
            finish(rng.randrange(len(running)))
        else:
            j = _job(rng, next_id, list(jobs))
            jobs[next_id] = j
            next_id += 1
            starts(q.add(j))
        assert q.waiting.keys() == {x for x in jobs if x not in started}, f"seed {seed}"
    while running:  # everything left finishes: every job has started by then
        finish(0)
    assert sorted(started) == sorted(jobs), f"seed {seed}: never started"
    assert len(q) == 0 and not q.waiting
