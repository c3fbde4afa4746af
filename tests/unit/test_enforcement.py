"""The limits each enforcement mode puts on a grant (mcpresd.core.enforcement): pure values."""

from __future__ import annotations

import pytest

from mcpresd.core.enforcement import Grant, Limits, Overuse, effective_mode, grant_of, limits_for, over_grant
from mcpresd.core.errors import InvalidRequest
from mcpresd.protocol import EnforceMode

OFF, SOFT, HARD = EnforceMode.OFF, EnforceMode.SOFT, EnforceMode.HARD
GIB = 1 << 30


@pytest.mark.parametrize(("requested", "default", "most", "expected"), [
    (None, SOFT, HARD, SOFT),
    (None, HARD, SOFT, SOFT),
    (HARD, SOFT, HARD, HARD),
    (OFF, HARD, HARD, OFF),
    (SOFT, SOFT, SOFT, SOFT),
])
def test_a_request_gets_its_mode_or_the_default_never_above_max_mode(requested, default, most, expected):
    assert effective_mode(requested, default, most) is expected


def test_asking_above_max_mode_is_refused_naming_the_field():
    with pytest.raises(InvalidRequest) as refused:
        effective_mode(HARD, SOFT, SOFT)
    assert refused.value.data["field"] == "enforce"
    assert "max_mode 'soft'" in refused.value.message


def test_the_grant_is_read_from_cpu_memory_and_named_cores():
    assert grant_of([("cpu", 1.5), ("memory", 2 * GIB), ("gpu0", 1)]) == Grant(cpu=1.5, memory=2 * GIB)
    assert grant_of([("cpu:3", 1), ("cpu:1", 1)]) == Grant(cpu=2, cores=(1, 3))
    assert grant_of([("licence", 1)]) == Grant()
    assert grant_of([("gpu:1", 1), ("gpu:0", 0.5), ("cpu", 1)]) == Grant(cpu=1, gpus=("gpu:0", "gpu:1"))


@pytest.mark.parametrize(
    ("mode", "granted", "denied"),
    [
        (HARD, (), (0, 3)),
        (HARD, ("gpu:1",), (0,)),
        (HARD, ("gpu:0", "gpu:1"), ()),
        (SOFT, (), ()),  # soft and off fence nothing
        (OFF, (), ()),
    ],
)
def test_hard_denies_the_device_nodes_of_the_gpus_not_granted(mode, granted, denied):  # type: ignore[no-untyped-def]
    gpus = {"gpu:0": 0, "gpu:1": 3}  # the minor of /dev/nvidiaN is NVML's, not always the index

    limits = limits_for(mode, Grant(cpu=1, gpus=granted), gpu_devices=gpus)

    assert limits.gpu_devices_denied == denied


def test_off_limits_nothing_and_makes_no_cgroup():
    limits = limits_for(OFF, Grant(cpu=2, memory=GIB))
    assert limits == Limits(OFF)
    assert not limits.contained


def test_soft_is_a_weight_and_a_memory_threshold_never_a_cap():
    limits = limits_for(SOFT, Grant(cpu=0.5, memory=128 << 20))
    assert limits.contained
    assert (limits.cpu_shares, limits.cpu_weight, limits.memory_soft) == (512, 50, 128 << 20)
    assert (limits.cpu_quota_us, limits.memory_max, limits.swap_max, limits.tasks_max, limits.cpus) == \
        (None, None, None, None, None)


def test_hard_caps_cpu_memory_swap_and_tasks_and_pins_named_cores():
    limits = limits_for(HARD, Grant(cpu=2, memory=GIB, cores=(2, 3)), tasks_max=100)
    assert limits.cpu_quota_us == 200_000 and limits.cpu_period_us == 100_000
    assert limits.cpus == (2, 3)
    assert (limits.memory_max, limits.swap_max, limits.tasks_max) == (GIB, 0, 100)
    assert limits.memory_soft is None


@pytest.mark.parametrize(("cpu", "shares", "weight", "quota"), [
    (0.001, 2, 1, 1_000),     # the kernel's floors
    (1, 1024, 100, 100_000),
    (500, 262_144, 10_000, 50_000_000),  # the ceilings of shares and weight
])
def test_cpu_figures_stay_within_what_the_kernel_accepts(cpu, shares, weight, quota):
    limits = limits_for(HARD, Grant(cpu=cpu))
    assert (limits.cpu_shares, limits.cpu_weight, limits.cpu_quota_us) == (shares, weight, quota)


def test_a_grant_without_cpu_or_memory_leaves_those_at_the_kernels_default():
    limits = limits_for(HARD, Grant())
    assert (limits.cpu_shares, limits.cpu_quota_us, limits.memory_max, limits.swap_max) == (None, None, None, None)
    assert limits.tasks_max is not None


def test_overuse_names_the_kind_the_grant_and_the_use():
    grant = Grant(cpu=1, memory=100)
    limits = limits_for(SOFT, grant)
    assert over_grant(limits, grant, 150, 0.5) == [{"kind": "memory", "granted": 100.0, "used": 150.0}]
    assert over_grant(limits, grant, 50, 1.8) == [{"kind": "cpu", "granted": 1, "used": 1.8}]
    assert over_grant(limits, grant, 100, 1.0) == []


def test_overuse_is_reported_after_two_rounds_over_once_per_spell():
    watch = Overuse()
    memory = {"kind": "memory", "granted": 100.0, "used": 150.0}
    assert watch.observe("a", [memory]) == []          # one round over: not yet longer than an interval
    assert watch.observe("a", [memory]) == [memory]    # the second round in a row: reported
    assert watch.current("a") == [memory]
    assert watch.observe("a", [{**memory, "used": 170.0}]) == []  # the same spell: not again
    assert watch.current("a") == [{**memory, "used": 170.0}]
    assert watch.observe("a", []) == [] and watch.current("a") == []  # back under: the spell ends
    assert watch.observe("a", [memory]) == []
    assert watch.observe("a", [memory]) == [memory]    # a new spell is reported again
    watch.forget("a")
    assert watch.current("a") == []
