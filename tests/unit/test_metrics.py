"""observe_many: the bulk observation the projector uses must expose what observe() would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from shared.metrics import observe_many

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _samples(h: Histogram) -> dict[tuple[str, str], float]:
    [metric] = list(h.collect())
    return {(s.name, s.labels.get("le", "")): s.value for s in metric.samples}


def test_observe_many_exposes_the_same_buckets_count_and_sum_as_observe() -> None:
    registry = CollectorRegistry()
    one = Histogram("one_by_one", "x", buckets=BUCKETS, registry=registry)
    bulk = Histogram("in_bulk", "x", buckets=BUCKETS, registry=registry)
    # Values on the bounds (a bound is inclusive), between them, past the last and zero.
    values = [0.0, 0.01, 0.010001, 0.05, 0.07, 1.0, 2.5, 2.6, 59.9, 60.0, 61.0, 1e6, 0.3, 0.3]
    for v in values:
        one.observe(v)
    observe_many(bulk, values)
    observe_many(bulk, [])
    got, want = _samples(bulk), _samples(one)
    assert {(n.replace("in_bulk", ""), le) for n, le in got} == {
        (n.replace("one_by_one", ""), le) for n, le in want
    }
    for (name, le), value in want.items():
        twin = got[(name.replace("one_by_one", "in_bulk"), le)]
        if name.endswith("_sum"):
            assert twin == pytest.approx(value)
        elif not name.endswith("_created"):
            assert twin == value, (name, le)


def test_observe_many_works_on_a_labelled_child() -> None:
    h = Histogram("labelled", "x", ["group"], buckets=BUCKETS, registry=CollectorRegistry())
    observe_many(h.labels("g"), [0.02, 0.02, 100.0])
    samples = _samples(h)
    assert samples[("labelled_bucket", "0.05")] == 2
    assert samples[("labelled_bucket", "+Inf")] == 3
    assert samples[("labelled_count", "")] == 3
