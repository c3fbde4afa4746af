"""allocate's and allocations.attach's enforcement parameters: shapes and refusals (mcpresd.params)."""

from __future__ import annotations

import pytest

from mcpresd import params
from mcpresd.params import InvalidParams
from mcpresd.protocol import EnforceMode

DEMAND = {"resources": [{"resource": "cpu", "amount": 1}]}


def test_enforce_keep_processes_and_confine_holder_are_read():
    command = params.allocate({**DEMAND, "enforce": "hard", "keep_processes": True, "holder_pid": 42,
                               "confine_holder": True})
    assert command.enforce is EnforceMode.HARD
    assert command.request.keep_processes and command.request.confine_holder


def test_without_enforce_the_daemon_decides():
    command = params.allocate(DEMAND)
    assert command.enforce is None
    assert not command.request.keep_processes and not command.request.confine_holder


@pytest.mark.parametrize(("extra", "field"), [
    ({"enforce": "strict"}, "enforce"),
    ({"enforce": 1}, "enforce"),
    ({"confine_holder": True}, "confine_holder"),
    ({"keep_processes": "yes"}, "keep_processes"),
])
def test_bad_enforcement_params_are_refused_naming_the_field(extra, field):
    with pytest.raises(InvalidParams) as refused:
        params.allocate({**DEMAND, **extra})
    assert refused.value.field == field


@pytest.mark.parametrize("pid", [0, -1, True, "12", 1 << 31, None])
def test_attach_takes_an_id_and_a_positive_pid(pid):
    assert params.attach({"id": "a", "pid": 7}) == params.AttachCommand("a", 7)
    with pytest.raises(InvalidParams) as refused:
        params.attach({"id": "a", "pid": pid})
    assert refused.value.field == "pid"
