"""The journal enforces the job state table on a real state.db: an illegal move is
refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.journal import Journal
from agent.store import JobRecord, Store
from protocol.errors import IllegalTransitionError
from protocol.messages import JobState, ReasonCode
from protocol.topics import Topics

DEV = "robot-7"


def _journal_with_job(tmp_path: Path) -> tuple[Store, Journal, JobRecord]:
    store = Store(tmp_path / "state.db")
    journal = Journal(store, Topics(), DEV)
    job = JobRecord("c-1", "deploy", JobState.RECEIVED, None, "det", "1.0.0", None)
    with store.tx() as db:
        store.insert_job(db, job)
        journal.record(db, job, JobState.RECEIVED)
    return store, journal, job


def test_a_finished_job_cannot_be_queued_again_and_nothing_is_written(tmp_path: Path) -> None:
    store, journal, job = _journal_with_job(tmp_path)
    journal.transition(job, JobState.QUEUED)
    journal.transition(job, JobState.CANCELED, code=ReasonCode.CANCELED.value, reason="x")
    events = store.outbox_size()

    with pytest.raises(IllegalTransitionError, match="from CANCELED to QUEUED"):
        journal.transition(job, JobState.QUEUED)

    stored = store.job("c-1")
    assert stored is not None and stored.state is JobState.CANCELED
    assert store.outbox_size() == events
    assert job.state is JobState.CANCELED


def test_a_job_cannot_skip_from_received_to_activating(tmp_path: Path) -> None:
    store, journal, job = _journal_with_job(tmp_path)
    with pytest.raises(IllegalTransitionError) as err:
        journal.transition(job, JobState.ACTIVATING)
    assert err.value.code == "internal"
    stored = store.job("c-1")
    assert stored is not None and stored.state is JobState.RECEIVED


def test_a_repeated_validating_event_is_legal(tmp_path: Path) -> None:
    _, journal, job = _journal_with_job(tmp_path)
    for state in (JobState.QUEUED, JobState.DOWNLOADING, JobState.VERIFYING,
                  JobState.BUILDING, JobState.VALIDATING, JobState.VALIDATING):  # fmt: skip
        journal.transition(job, state)
    assert job.state is JobState.VALIDATING
