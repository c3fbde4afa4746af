"""The cluster site's refusals that happen before Slurm is asked: whose jobs, and what a cluster grants."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from mcpresd import params
from mcpresd.cluster.site import ClusterSite
from mcpresd.cluster.slurm import ClusterConfig
from mcpresd.core.cluster import ClusterJob, ClusterRequest, Partition
from mcpresd.core.errors import InvalidRequest, PermissionDenied
from mcpresd.service import Caller


class UnaskedCluster:
    """A cluster that fails the test if anything reaches it."""

    async def partitions(self) -> list[Partition]:
        raise AssertionError("Slurm was asked")

    async def jobs(self) -> list[ClusterJob]:
        raise AssertionError("Slurm was asked")

    async def submit(self, request: ClusterRequest, as_user: tuple[int, int] | None = None) -> Any:
        raise AssertionError("Slurm was asked")

    async def cancel(self, job_ids: Sequence[int]) -> None:
        raise AssertionError("Slurm was asked")

    async def nodes_of(self, job_id: int) -> str:
        raise AssertionError("Slurm was asked")

    def step_argv(self, job_id: int, argv: Sequence[str]) -> list[str]:
        return []


def site(daemon_uid: int) -> ClusterSite:
    def no_store(job: Any) -> Any:
        raise AssertionError("the store was written")

    return ClusterSite(UnaskedCluster(), ClusterConfig(), no_store, lambda pid, start: None, lambda: 0.0,
                       lambda pid, start: True, lambda *args: (1, None), daemon_uid=daemon_uid)


def allocate(cluster_site: ClusterSite, caller: Caller, resources: list[dict[str, Any]]) -> Any:
    command = params.allocate({"resources": resources, "site": "cluster"})

    async def local(changed: Any = None) -> Any:
        raise AssertionError("the host was asked")

    return asyncio.run(cluster_site.allocate(caller, command, local))


def test_a_users_daemon_submits_no_job_for_another_user() -> None:
    with pytest.raises(PermissionDenied, match="runs as uid 1000 and submits cluster jobs only as that user"):
        allocate(site(1000), Caller(uid=2000, gid=2000, pid=None), [{"resource": "cpu", "amount": 1}])


def test_a_system_daemon_submits_as_the_user_who_asked() -> None:
    assert site(0)._submitter(Caller(uid=2000, gid=3000, pid=None)) == (2000, 3000)
    assert site(0)._submitter(Caller(uid=0, gid=0, pid=None)) is None
    assert site(1000)._submitter(Caller(uid=1000, gid=1000, pid=None)) is None


@pytest.mark.parametrize(("resources", "words"), [
    ([{"resource": "licence", "amount": 1}], "the cluster grants cpu, memory and gpu"),
    ([{"resource": "gpu", "amount": 0.5}], "whole GPUs"),
])
def test_what_the_cluster_cannot_grant_is_refused_before_slurm_is_asked(resources: list[dict[str, Any]],
                                                                       words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        allocate(site(0), Caller(uid=0, gid=0, pid=None), resources)
