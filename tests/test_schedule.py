import math

import pytest

from superpose.schedule import PhaseSchedule, Stage, lr_at


def test_two_phase_boundary():
    s = PhaseSchedule.two_phase(bag=6, ratio=0.3, total_steps=100)
    assert [s.bag_at(i) for i in (0, 29, 30, 99)] == [6, 6, 1, 1]
    assert s.switch_steps() == [30]
    assert s.stage_at(29) == 0 and s.stage_at(30) == 1
    assert s.bags() == [6, 1]


def test_empty_stages_dropped_and_equal_neighbours_merged():
    s = PhaseSchedule([(0.0, 8), (0.2, 4), (0.4, 4), (1.0, 1)], total_steps=10)
    assert s.bags() == [4, 1] and s.ends == [4, 10]
    assert s.stage_at(0) == 0 and s.stage_at(4) == 1
    baseline = PhaseSchedule.two_phase(4, 0.0, 10)
    assert baseline.bags() == [1] and baseline.stage_at(9) == 0


def test_multi_stage_with_steps_and_fractions():
    s = PhaseSchedule([(10, 8), (0.2, 4), Stage(1.0, 1)], total_steps=100)
    assert [s.bag_at(i) for i in (0, 9, 10, 19, 20, 99)] == [8, 8, 4, 4, 1, 1]
    assert s.switch_steps() == [10, 20]


def test_ratio_zero_and_one():
    assert PhaseSchedule.two_phase(4, 0.0, 10).switch_steps() == []
    assert PhaseSchedule.two_phase(4, 0.0, 10).bag_at(0) == 1
    full = PhaseSchedule.two_phase(4, 1.0, 10)
    assert all(full.bag_at(i) == 4 for i in range(10))


@pytest.mark.parametrize(
    "stages, message",
    [
        ([(0.5, 4), (0.2, 2), (1.0, 1)], "in order"),
        ([(0.3, 0), (1.0, 1)], "bag must be"),
        ([(1.5, 4), (1.0, 1)], "outside"),
        ([(0.3, 4)], "last stage"),
        ([], "at least one"),
        ([(-1, 4), (1.0, 1)], "negative"),
        ([("half", 4), (1.0, 1)], "until"),
    ],
)
def test_bad_schedules(stages, message):
    with pytest.raises(ValueError, match=message):
        PhaseSchedule(stages, 100)


def test_ratio_outside_unit_interval():
    with pytest.raises(ValueError, match="ratio"):
        PhaseSchedule.two_phase(4, 1.2, 10)


def test_wsd_shape():
    kw = dict(peak=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_ratio=0.1)
    lrs = [lr_at(i, 100, **kw) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_cosine_shape():
    lrs = [lr_at(i, 50, peak=2.0, schedule="cosine", warmup_steps=5) for i in range(50)]
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    mid = 5 + 45 // 2
    assert lrs[mid - 1] == pytest.approx(1.0 + math.cos(math.pi * (mid - 5) / 45), rel=1e-9)


def test_unknown_lr_schedule():
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_at(0, 10, peak=1.0, schedule="step")
