"""Wave planning and failure accounting: pure functions, no broker."""

from __future__ import annotations

import pytest

from controller.rollouts.driver import WaveSpecError, crosses, parse_waves, plan_waves


def ids(n: int) -> list[str]:
    return [f"robot-{i:03d}" for i in range(n)]


def test_default_waves_are_one_canary_then_ten_percent_then_the_rest() -> None:
    waves = plan_waves(ids(100), parse_waves("1,10%,100%"))
    assert [len(w) for w in waves] == [1, 9, 90]
    assert waves[0] == ["robot-000"]
    assert [d for w in waves for d in w] == ids(100)


def test_devices_are_taken_in_sorted_id_order_whatever_the_input_order() -> None:
    waves = plan_waves(["b", "c", "a"], parse_waves("1,100%"))
    assert waves == [["a"], ["b", "c"]]


def test_canary_option_puts_that_device_first() -> None:
    waves = plan_waves(ids(3), parse_waves("1,100%"), canary="robot-002")
    assert waves == [["robot-002"], ["robot-000", "robot-001"]]


def test_percentages_round_up_and_empty_waves_are_dropped() -> None:
    # 10% of 3 devices is 1 device, which the canary already covers.
    assert [len(w) for w in plan_waves(ids(3), parse_waves("1,10%,100%"))] == [1, 2]
    assert [len(w) for w in plan_waves(ids(5), parse_waves("50%,100%"))] == [3, 2]


def test_a_spec_that_stops_short_still_covers_the_whole_target() -> None:
    assert [len(w) for w in plan_waves(ids(10), parse_waves("2,5"))] == [2, 3, 5]


def test_counts_larger_than_the_target_are_clamped() -> None:
    assert plan_waves(ids(2), parse_waves("5,100%")) == [ids(2)]


@pytest.mark.parametrize("spec", ["", "1,,100%", "0", "-1", "150%", "0%", "ten", "1,x%"])
def test_bad_wave_specs_are_rejected_with_a_reason(spec: str) -> None:
    with pytest.raises(WaveSpecError, match="--waves"):
        parse_waves(spec)


def test_shrinking_waves_are_rejected() -> None:
    with pytest.raises(WaveSpecError, match="shrink"):
        plan_waves(ids(10), parse_waves("5,2"))


def test_canary_outside_the_target_is_rejected() -> None:
    with pytest.raises(WaveSpecError, match="not in the target"):
        plan_waves(ids(3), parse_waves("1,100%"), canary="robot-999")


def test_failure_rate_aborts_only_when_strictly_above_the_threshold() -> None:
    assert crosses(assigned=1, failed=1, max_failure_rate=0.05)
    assert not crosses(assigned=3, failed=1, max_failure_rate=0.34)
    assert crosses(assigned=3, failed=2, max_failure_rate=0.34)
    assert not crosses(assigned=20, failed=1, max_failure_rate=0.05)
    assert crosses(assigned=1, failed=1, max_failure_rate=0.0)
    assert not crosses(assigned=0, failed=0, max_failure_rate=0.0)
