"""Foreign GPU use: which compute processes the grants do not cover, once per spell; cgroup membership parsing."""

from __future__ import annotations

import pytest

from mcpresd.core.risk import ForeignSpells, GpuProcess, foreign_gpu_use
from mcpresd.enforce import allocation_in

HOLDER, CHILD, STRANGER = 100, 101, 200
HELD_BY = {HOLDER: {"a-gpu"}, 300: {"a-slot"}}


@pytest.mark.parametrize(
    ("process", "granted", "members", "expected"),
    [
        # the holder's own process tree on its GPU: covered
        (GpuProcess(CHILD, 1, (CHILD, HOLDER)), {"a-gpu"}, {}, None),
        # outside every allocation, on a GPU nobody holds: nobody's business
        (GpuProcess(STRANGER, 1, (STRANGER,)), set(), {}, None),
        # outside every allocation, on a GPU someone holds
        (GpuProcess(STRANGER, 1, (STRANGER,)), {"a-gpu"}, {}, ((), ("a-gpu",))),
        # a process of an allocation that was not granted this GPU, whether it is held or not
        (GpuProcess(301, 1, (301, 300)), set(), {}, (("a-slot",), ())),
        (GpuProcess(301, 1, (301, 300)), {"a-gpu"}, {}, (("a-slot",), ("a-gpu",))),
        # cgroup membership counts where the tree does not show it (re-parented to init)
        (GpuProcess(STRANGER, 1, (STRANGER,)), {"a-gpu"}, {STRANGER: "a-slot"}, (("a-slot",), ("a-gpu",))),
        (GpuProcess(STRANGER, 1, (STRANGER,)), {"a-gpu"}, {STRANGER: "a-gpu"}, None),
        # NVML gave no pid: nothing to attribute
        (GpuProcess(None, 1), {"a-gpu"}, {}, None),
    ],
)
def test_which_processes_the_grants_do_not_cover(process: GpuProcess, granted: set[str], members: dict[int, str],
                                                 expected: tuple[tuple[str, ...], tuple[str, ...]] | None) -> None:
    found = foreign_gpu_use("gpu:0", [process], granted, members, HELD_BY)

    assert [(f.allocations, f.granted) for f in found] == ([] if expected is None else [expected])
    assert all(f.pid == process.pid and f.gpu == "gpu:0" for f in found)


def test_each_gpu_and_pid_is_reported_once_per_spell() -> None:
    spells = ForeignSpells()
    use = foreign_gpu_use("gpu:0", [GpuProcess(STRANGER, 1, (STRANGER,))], {"a-gpu"}, {}, {})
    other = foreign_gpu_use("gpu:0", [GpuProcess(7, 1, (7,))], {"a-gpu"}, {}, {})

    assert spells.observe("gpu:0", use) == use
    assert spells.observe("gpu:0", use) == []
    assert spells.observe("gpu:0", use + other) == other
    assert spells.observe("gpu:1", use) == use  # another GPU, another spell
    assert spells.observe("gpu:0", []) == []
    assert spells.observe("gpu:0", use) == use  # it came back: a new spell


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4:memory:/mcpres/alloc-abc123\n3:cpu:/mcpres/alloc-abc123\n", "abc123"),
        ("0::/mcpres/alloc-abc123\n", "abc123"),
        ("0::/system.slice/mcpresd.service/mcpres/alloc-f00\n", "f00"),
        ("4:memory:/other/alloc-abc123\n", None),  # another daemon's subtree
        ("4:memory:/mcpres/alloc-\n", None),
        ("4:memory:/mcpres\n0::/user.slice\n", None),
        ("", None),
    ],
)
def test_the_allocation_a_process_cgroup_file_names(text: str, expected: str | None) -> None:
    assert allocation_in(text, "mcpres") == expected
