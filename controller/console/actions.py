"""Operator actions from the console: the same store transitions and driver hand-off as
`jetfleet rollout pause|resume|abort|promote` (controller/rollouts/driver.py, the CLI's driver),
so every command a device receives is signed by the one driver path."""

from __future__ import annotations

from typing import Any

from controller.fleet.access import open_store
from controller.rollouts.driver import pause, promote, resume_state
from controller.rollouts.launch import spawn_driver
from controller.rollouts.lease import current_driver
from controller.rollouts.store import FINISHED, PAUSED
from controller.settings import ControllerSettings
from protocol.errors import CodedError


class ActionError(CodedError):
    """An action the rollout's state does not allow (409) or a rollout that is not (404)."""

    code = "console_action"

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _change(store: Any, r: Any, action: str) -> bool:
    if action == "pause":
        return pause(store, r.id)
    if action == "promote":
        return promote(store, r.id)
    if action == "abort":
        return store.request_abort(r.id, "aborted by the operator (console)", r.auto_rollback)
    if r.state == PAUSED:
        resume_state(store, r.id)
    return r.state not in FINISHED


def run_action(s: ControllerSettings, action: str, rollout_id: str) -> dict[str, Any]:
    store, _ = open_store(s)
    r = store.find(rollout_id)
    if r is None:
        raise ActionError(404, f"no rollout {rollout_id!r}")
    if not _change(store, r, action):
        raise ActionError(409, f"rollout {r.id} is {r.state}; it cannot {action} now")
    driver = r.driver_pid
    if action != "pause" and current_driver(store, r.id) is None:
        driver = spawn_driver(s, r.id)  # it signs and sends what the change needs
    return {"rollout": r.id, "action": action, "driver_pid": driver,
            "state": (store.get(r.id) or r).state}  # fmt: skip
