"""Ledger.add_many: the same ledger as adding one by one, in one sort; all or nothing."""

from __future__ import annotations

import random

import pytest

from mcpresd.core.errors import ResourceExists
from mcpresd.core.ledger import Ledger
from mcpresd.core.model import Demand, Resource
from mcpresd.protocol import ResourceType as T


def resources(count: int, seed: int) -> list[Resource]:
    shuffled = random.Random(seed)
    made = [Resource(name=f"r-{shuffled.randrange(10 ** 6)}-{i}", type=T.CUSTOM, capacity=1, unit="units",
                     labels={"index": shuffled.randrange(5)} if i % 3 else {}) for i in range(count)]
    made += [Resource(name=f"gpu{i}", type=T.GPU, capacity=1, unit="gpus", uuid=f"GPU-{i}",
                      labels={"index": 7 - i}) for i in range(8)]
    shuffled.shuffle(made)
    return made


@pytest.mark.parametrize("seed", range(5))
def test_adding_many_gives_the_order_and_fits_of_adding_one_by_one(seed: int) -> None:
    made = resources(300, seed)
    one_by_one, at_once = Ledger(), Ledger()
    for resource in made:
        one_by_one.add(resource)
    for start in range(0, len(made), 97):
        at_once.add_many(made[start:start + 97])

    assert at_once.resources() == one_by_one.resources()
    for kind in (T.CUSTOM, T.GPU):
        assert at_once._by_type[kind] == one_by_one._by_type[kind]
    assert at_once.plan([Demand("gpu", 3)]) == one_by_one.plan([Demand("gpu", 3)])
    assert at_once.find("GPU-5") == one_by_one.find("GPU-5")


@pytest.mark.parametrize("clash", ["r-taken", "GPU-0", "twice"])
def test_one_name_taken_adds_none(clash: str) -> None:
    ledger = Ledger([Resource(name="r-taken", type=T.CUSTOM, capacity=1, unit="units"),
                     Resource(name="gpu0", type=T.GPU, capacity=1, unit="gpus", uuid="GPU-0")])
    before = (ledger.resources(), ledger.version)
    batch = [Resource(name="new", type=T.CUSTOM, capacity=1, unit="units"),
             Resource(name=clash, type=T.CUSTOM, capacity=1, unit="units")]
    if clash == "twice":
        batch.append(Resource(name="twice", type=T.CUSTOM, capacity=2, unit="units"))

    with pytest.raises(ResourceExists):
        ledger.add_many(batch)

    assert (ledger.resources(), ledger.version) == before
    assert "new" not in ledger


@pytest.mark.parametrize("first, second", [("none", "none"), ("none", "some"), ("some", "none"), ("some", "some")])
def test_batches_with_and_without_indexed_resources_keep_the_one_by_one_order(first: str, second: str) -> None:
    def batch(start: int, indexed: str) -> list[Resource]:
        return [Resource(name=f"r{i}", type=T.CUSTOM, capacity=1, unit="units",
                         labels={"index": (-1, 3, 1 << 40)[i % 3]} if indexed == "some" and i % 4 == 0 else {})
                for i in range(start, start + 50)]
    made = batch(0, first) + batch(50, second)  # r10 sorts before r2 by name, after it by number
    one_by_one, at_once = Ledger(), Ledger()
    for resource in made:
        one_by_one.add(resource)
    at_once.add_many(made[:50])
    at_once.add_many(made[50:])
    assert at_once._by_type[T.CUSTOM] == one_by_one._by_type[T.CUSTOM]
