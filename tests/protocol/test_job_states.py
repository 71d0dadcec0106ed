"""The job state transition table: complete, closed at the terminal states, and the
documented happy path legal step by step."""

from __future__ import annotations

import itertools

from protocol.messages import (
    CANCELABLE_STATES,
    PIPELINE,
    PRE_ACTIVATION_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
)


def test_every_state_has_a_row_and_names_only_states() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for targets in TRANSITIONS.values():
        assert targets <= set(JobState)


def test_the_happy_path_is_legal_step_by_step() -> None:
    for old, new in itertools.pairwise(PIPELINE):
        assert old.can_move_to(new), f"{old.value} -> {new.value}"


def test_a_terminal_state_goes_nowhere() -> None:
    for state in TERMINAL_STATES:
        assert not any(state.can_move_to(new) for new in JobState), state.value


def test_no_state_goes_back_to_received_or_queued() -> None:
    for state in set(JobState) - {JobState.RECEIVED}:
        assert not state.can_move_to(JobState.RECEIVED)
        assert not state.can_move_to(JobState.QUEUED)


def test_past_the_switch_a_job_only_succeeds_or_rolls_back() -> None:
    assert TRANSITIONS[JobState.ACTIVATING] == {
        JobState.PROBATION,
        JobState.SUCCEEDED,
        JobState.ROLLED_BACK,
    }
    assert TRANSITIONS[JobState.PROBATION] == {JobState.SUCCEEDED, JobState.ROLLED_BACK}
    assert not JobState.ACTIVATING.can_move_to(JobState.CANCELED)


def test_only_a_job_that_has_not_started_activating_is_cancelable() -> None:
    assert PRE_ACTIVATION_STATES < CANCELABLE_STATES
    assert CANCELABLE_STATES.isdisjoint(TERMINAL_STATES | {JobState.ACTIVATING})
    for state in CANCELABLE_STATES:
        assert state.can_move_to(JobState.CANCELED), state.value


def test_a_held_job_activates_waits_again_starts_over_or_ends_without_activating() -> None:
    held = JobState.ON_HOLD
    assert JobState.VALIDATING.can_move_to(held) and held.can_move_to(held)
    assert held.can_move_to(JobState.ACTIVATING) and held.can_move_to(JobState.DOWNLOADING)
    assert held.can_move_to(JobState.DEFERRED) and held in CANCELABLE_STATES
    assert not held.can_move_to(JobState.ROLLED_BACK)  # nothing was switched yet
    # DEFERRED ends only a hold; it is terminal and not a failure of the model.
    assert [s for s in JobState if s.can_move_to(JobState.DEFERRED)] == [held]
    assert JobState.DEFERRED.terminal and not JobState.DEFERRED.failed


def test_a_staged_job_is_parked_between_the_gate_and_its_activate_command() -> None:
    staged = JobState.STAGED
    assert JobState.VALIDATING.can_move_to(staged) and staged in CANCELABLE_STATES
    assert staged.can_move_to(JobState.ON_HOLD) and staged.can_move_to(JobState.ACTIVATING)
    assert not staged.can_move_to(JobState.DEFERRED) and not staged.terminal
    assert [s for s in JobState if s.can_move_to(staged)] == [
        JobState.DOWNLOADING, JobState.VERIFYING, JobState.BUILDING, JobState.VALIDATING,
    ]  # fmt: skip
