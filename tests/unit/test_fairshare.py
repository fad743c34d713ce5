"""kombu's queue cycle for fair share (kiq/fairshare.py): the order a worker's BRPOP names its queues in."""

import pytest

from kiq import fairshare
from kiq.errors import SettingsError
from kiq.settings import Settings
from producer.tenants import Tenants


def serve(cycle: fairshare.FairCycle, waiting: dict[str, int], n: int) -> list[str]:
    """What one worker takes, n times: the first queue in the cycle's order that has a job (one priority)."""
    taken = []
    for _ in range(n):
        queue = next(q for q in cycle.consume(len(cycle.items)) if waiting.get(q))
        waiting[queue] -= 1
        cycle.rotate(queue)
        taken.append(queue)
    return taken


def test_tenants_take_turns_and_a_new_one_goes_first():
    fairshare.learn("q", {"q.t.a": 1, "q.t.b": 1})
    cycle = fairshare.FairCycle(["q"])
    cycle.update(["q", "q.t.a"])
    assert serve(cycle, {"q.t.a": 10}, 2) == ["q.t.a"] * 2
    cycle.update(["q", "q.t.a", "q.t.b"])  # b arrives behind a's backlog: it does not wait a round
    assert serve(cycle, {"q.t.a": 10, "q.t.b": 2, "q": 1}, 6) == ["q.t.b", "q", "q.t.a", "q.t.b", "q.t.a", "q.t.a"]


def test_a_weight_is_turns_in_a_row():
    fairshare.learn("w", {"w.t.heavy": 2, "w.t.light": 1})
    cycle = fairshare.FairCycle(["w", "w.t.heavy", "w.t.light"])
    taken = serve(cycle, {"w.t.heavy": 20, "w.t.light": 20}, 9)
    assert taken == ["w.t.heavy", "w.t.heavy", "w.t.light"] * 3


def test_routed_queues_keep_the_workers_order_and_turns_stay_within_one():
    fairshare.learn("first", {"first.t.a": 1})
    fairshare.learn("second", {"second.t.a": 1})
    cycle = fairshare.FairCycle(["first", "second"])
    cycle.update(["first", "second", "second.t.a", "first.t.a"])
    assert cycle.consume(4) == ["first.t.a", "first", "second.t.a", "second"]
    cycle.rotate("first.t.a")
    assert cycle.consume(4) == ["first", "first.t.a", "second.t.a", "second"]
    cycle.update(["first", "first.t.a"])  # a cancel keeps the others' places
    assert cycle.consume(4) == ["first", "first.t.a"]


def test_tenant_weight_and_admin_scope_from_the_tenants_file():
    raw = '{"tenants": [{"name": "a", "key": "k1", "weight": 3, "admin": true}, {"name": "b", "key": "k2"}]}'
    tenants = Tenants.from_settings(Settings(api_tenants=raw))
    assert (tenants.by_key["k1"].weight, tenants.by_key["k1"].admin) == (3, True)
    assert (tenants.by_key["k2"].weight, tenants.by_key["k2"].admin) == (1, False)
    for bad in ('"weight": 0', '"weight": 101', '"weight": true', '"admin": "yes"'):
        with pytest.raises(SettingsError, match="KIQ_API_TENANTS: a:"):
            Tenants.from_settings(Settings(api_tenants='{"tenants": [{"name": "a", "key": "k", ' + bad + "}]}"))
