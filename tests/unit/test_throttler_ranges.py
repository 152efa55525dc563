"""Unit tests of services.throttler.ranges: the platform-wide and per-function normal ranges."""

from __future__ import annotations

from collections import deque

import pytest

from services.throttler.ranges import Bounds, NormalRanges, RangeConfig, Series, robust_upper

MAD_SCALE = 1.4826


# --- robust_upper and Series ---------------------------------------------------------------------


def test_robust_upper_on_known_data() -> None:
    # median 3, absolute deviations [2, 1, 0, 1, 97] -> MAD 1: the 100 does not drag the bound up.
    assert robust_upper([1, 2, 3, 4, 100], k=5.0) == pytest.approx(3 + 5 * MAD_SCALE)
    # median 20, deviations [10, 0, 10] -> MAD 10.
    assert robust_upper(deque([10.0, 20.0, 30.0]), k=2.0) == pytest.approx(20 + 2 * 10 * MAD_SCALE)
    # Even count: median is the mean of the middle two (25), deviations [15, 5, 5, 15] -> MAD 10.
    assert robust_upper([10, 20, 30, 40], k=1.0) == pytest.approx(25 + 10 * MAD_SCALE)


def test_robust_upper_edge_cases() -> None:
    assert robust_upper([], k=5.0) == 0.0
    assert robust_upper(deque(), k=5.0) == 0.0
    assert robust_upper([42.0] * 7, k=5.0) == 42.0  # no spread: the median itself
    assert robust_upper([7.0], k=100.0) == 7.0


def test_series_is_a_sliding_window() -> None:
    s = Series(3)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        s.add(v)
    assert list(s.values) == [3.0, 4.0, 5.0]


# --- the platform range --------------------------------------------------------------------------


def test_empty_platform_is_held_at_the_floor() -> None:
    ranges = NormalRanges(RangeConfig())
    assert ranges.platform() == Bounds(300.0, 128.0, "platform")


def test_idle_population_gets_the_floor_not_zero() -> None:
    """Median ~0 and MAD ~0: without the floor every instance that does anything would be abnormal."""
    ranges = NormalRanges(RangeConfig())
    for i in range(200):
        ranges.learn(f"fn-{i % 10}", 1.0 if i % 2 else 0.0, 5.0, outlier=False)
    assert ranges.platform() == Bounds(300.0, 128.0, "platform")


def test_platform_bound_between_floor_and_ceiling_is_the_robust_statistic() -> None:
    ranges = NormalRanges(RangeConfig())
    cpu = [100.0, 150.0, 200.0, 250.0, 300.0]  # median 200, MAD 50 -> 200 + 5 * 74.13 = 570.65
    memory = [140.0, 150.0, 160.0, 170.0, 180.0]  # median 160, MAD 10 -> 160 + 5 * 14.826 = 234.13
    for c, m in zip(cpu, memory, strict=True):
        ranges.learn("f", c, m, outlier=False)
    bounds = ranges.platform()
    assert bounds.cpu_millis == pytest.approx(200 + 5 * 50 * MAD_SCALE)
    assert bounds.memory_mb == pytest.approx(160 + 5 * 10 * MAD_SCALE)
    assert bounds.source == "platform"


def test_one_heavy_function_cannot_make_itself_normal() -> None:
    """A population dominated by a heavy function would learn its figures as normal: the ceiling holds."""
    ranges = NormalRanges(RangeConfig())
    for _ in range(90):
        ranges.learn("heavy", 2000.0, 2048.0, outlier=False)
    for _ in range(10):
        ranges.learn("light", 10.0, 20.0, outlier=False)
    assert robust_upper(ranges.cpu.values, 5.0) >= 2000.0  # what it would be without the ceiling
    assert ranges.platform() == Bounds(800.0, 512.0, "platform")
    # Not even through its own baseline: a function's bound is never laxer than the platform's.
    heavy = ranges.for_function("heavy")
    assert heavy.source == "function baseline"
    assert heavy.cpu_millis == 800.0
    assert heavy.memory_mb == 512.0
    assert 2000.0 > heavy.cpu_millis


def test_custom_floor_and_ceiling_are_honoured() -> None:
    config = RangeConfig(cpu_floor=50.0, cpu_ceiling=100.0, memory_floor=10.0, memory_ceiling=20.0)
    ranges = NormalRanges(config)
    assert ranges.platform() == Bounds(50.0, 10.0, "platform")
    for _ in range(10):
        ranges.learn("f", 5000.0, 5000.0, outlier=True)
    assert ranges.platform() == Bounds(100.0, 20.0, "platform")


def test_sliding_window_forgets_old_samples() -> None:
    ranges = NormalRanges(RangeConfig(window=10, baseline_min_samples=5))
    for _ in range(10):
        ranges.learn("f", 5000.0, 5000.0, outlier=False)
    assert ranges.platform() == Bounds(800.0, 512.0, "platform")
    for _ in range(10):
        ranges.learn("f", 0.0, 0.0, outlier=False)
    assert len(ranges.cpu.values) == 10
    assert ranges.platform() == Bounds(300.0, 128.0, "platform")  # the heavy past is gone
    # The function's own series slides too: its baseline is now the idle one.
    assert len(ranges.fn_cpu["f"].values) == 10
    own = ranges.for_function("f")
    assert own == Bounds(150.0, 64.0, "function baseline")


# --- a function's own range ----------------------------------------------------------------------


def _idle_population(ranges: NormalRanges, n: int = 100) -> None:
    for i in range(n):
        ranges.learn(f"other-{i % 5}", 10.0, 30.0, outlier=False)


def test_new_function_is_judged_by_the_platform_range_from_its_first_sample() -> None:
    ranges = NormalRanges(RangeConfig())
    _idle_population(ranges)
    assert ranges.for_function("new") == ranges.platform()  # before its first sample
    ranges.learn("new", 50.0, 40.0, outlier=False)
    assert ranges.for_function("new") == ranges.platform()  # after it
    assert ranges.for_function(None) == ranges.platform()  # no function: the platform too


def test_function_baseline_needs_baseline_min_samples() -> None:
    config = RangeConfig()
    ranges = NormalRanges(config)
    _idle_population(ranges)
    for _ in range(config.baseline_min_samples - 1):
        ranges.learn("f", 50.0, 40.0, outlier=False)
    assert ranges.for_function("f").source == "platform"
    ranges.learn("f", 50.0, 40.0, outlier=False)
    assert ranges.for_function("f").source == "function baseline"


def test_function_baseline_is_stricter_and_catches_a_sudden_change_under_the_platform_bound() -> None:
    config = RangeConfig()
    ranges = NormalRanges(config)
    _idle_population(ranges)
    for i in range(config.baseline_min_samples):
        ranges.learn("f", 40.0 if i % 2 else 60.0, 40.0, outlier=False)
    platform = ranges.platform()
    own = ranges.for_function("f")
    # median 50, MAD 10 -> 50 + 5 * 14.826 = 124.1; margin 2 * 50 = 100; half the floor 150 wins.
    assert own.cpu_millis == pytest.approx(config.cpu_floor / 2)
    # memory: all 40 -> MAD 0; margin 80; half the floor 64 -> 80.
    assert own.memory_mb == pytest.approx(40.0 * config.baseline_margin)
    assert own.cpu_millis < platform.cpu_millis
    assert own.memory_mb < platform.memory_mb
    sudden = 250.0  # five times its usual CPU, still under the platform's 300m
    assert sudden < platform.cpu_millis
    assert sudden > own.cpu_millis


def test_function_baseline_uses_the_robust_statistic_when_it_is_the_largest() -> None:
    config = RangeConfig(baseline_min_samples=4)
    ranges = NormalRanges(config)
    _idle_population(ranges)
    for c in (10.0, 20.0, 30.0, 40.0):  # median 25, MAD 10 -> 25 + 5 * 14.826 = 99.1
        ranges.learn("f", c, 30.0, outlier=False)
    for c in (10.0, 20.0, 30.0, 40.0):
        ranges.learn("f", c, 30.0, outlier=False)
    # 99.1 < 150 (half the floor): the floor half wins; shrink the floor to see the statistic.
    assert ranges.for_function("f").cpu_millis == pytest.approx(150.0)
    small = NormalRanges(RangeConfig(baseline_min_samples=4, cpu_floor=20.0))
    for c in (10.0, 20.0, 30.0, 40.0):
        small.learn("f", c, 30.0, outlier=False)
    for _ in range(50):
        small.learn("other", 500.0, 30.0, outlier=False)  # lifts the platform well above the baseline
    assert small.for_function("f").cpu_millis == pytest.approx(25 + 5 * 10 * MAD_SCALE)


def test_function_baseline_is_never_laxer_than_the_platform() -> None:
    config = RangeConfig()
    ranges = NormalRanges(config)
    _idle_population(ranges, 500)
    for _ in range(config.baseline_min_samples):
        ranges.learn("f", 400.0, 200.0, outlier=False)  # its own normal is above the platform's
    platform = ranges.platform()
    assert platform == Bounds(300.0, 128.0, "platform")
    own = ranges.for_function("f")
    assert own == Bounds(300.0, 128.0, "function baseline")


def test_outlier_samples_do_not_enter_the_function_baseline() -> None:
    config = RangeConfig()
    ranges = NormalRanges(config)
    for _ in range(config.baseline_min_samples):
        ranges.learn("f", 50.0, 40.0, outlier=False)
    before = ranges.for_function("f")
    for _ in range(100):
        ranges.learn("f", 5000.0, 5000.0, outlier=True)
    assert len(ranges.fn_cpu["f"].values) == config.baseline_min_samples
    assert len(ranges.fn_memory["f"].values) == config.baseline_min_samples
    assert ranges.for_function("f") == before  # it did not teach itself that 5000m is normal
    # ...but they do feed the population (that is what the ceiling is for).
    assert len(ranges.cpu.values) == config.baseline_min_samples + 100
    assert ranges.platform() == Bounds(800.0, 512.0, "platform")


def test_a_function_made_only_of_outliers_has_no_baseline() -> None:
    ranges = NormalRanges(RangeConfig())
    for _ in range(100):
        ranges.learn("f", 5000.0, 5000.0, outlier=True)
    assert "f" not in ranges.fn_cpu
    assert ranges.for_function("f").source == "platform"


def test_samples_without_a_function_feed_only_the_population() -> None:
    ranges = NormalRanges(RangeConfig())
    ranges.learn(None, 10.0, 10.0, outlier=False)
    assert len(ranges.cpu.values) == 1
    assert len(ranges.memory.values) == 1
    assert ranges.fn_cpu == {}
    assert ranges.fn_memory == {}


def test_functions_have_separate_baselines() -> None:
    config = RangeConfig(baseline_min_samples=3, cpu_floor=10.0, memory_floor=10.0)
    ranges = NormalRanges(config)
    for _ in range(3):
        ranges.learn("a", 20.0, 20.0, outlier=False)
        ranges.learn("b", 200.0, 100.0, outlier=False)
    for _ in range(20):
        ranges.learn("c", 1000.0, 1000.0, outlier=False)  # platform up to the ceiling
    assert ranges.for_function("a") == Bounds(40.0, 40.0, "function baseline")
    assert ranges.for_function("b") == Bounds(400.0, 200.0, "function baseline")


# --- spec overrides ------------------------------------------------------------------------------


def test_spec_overrides_win_over_platform_and_baseline() -> None:
    config = RangeConfig()
    ranges = NormalRanges(config)
    _idle_population(ranges)
    for _ in range(config.baseline_min_samples):
        ranges.learn("f", 50.0, 40.0, outlier=False)
    assert ranges.for_function("f").source == "function baseline"
    # Both given: both win, even laxer than the platform's ceiling (the user said so).
    assert ranges.for_function("f", 2000.0, 4096.0) == Bounds(2000.0, 4096.0, "function spec")
    # Stricter than the baseline too.
    assert ranges.for_function("f", 20.0, 10.0) == Bounds(20.0, 10.0, "function spec")


def test_spec_override_of_one_figure_leaves_the_other_to_the_platform() -> None:
    ranges = NormalRanges(RangeConfig())
    _idle_population(ranges)
    platform = ranges.platform()
    cpu_only = ranges.for_function("new", spec_cpu=1500.0)
    assert cpu_only == Bounds(1500.0, platform.memory_mb, "function spec")
    memory_only = ranges.for_function("new", spec_memory=1024.0)
    assert memory_only == Bounds(platform.cpu_millis, 1024.0, "function spec")
