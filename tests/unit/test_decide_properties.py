"""Properties of the admission rule over random pools: it never overcommits, and it never denies in vain."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget import ClusterView, Model, Node, Placement, decide_scale
from budget.view import matches

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 10_000.0
POOLS = [{}, {"pool": "a"}, {"pool": "b"}]

nodes_st = st.lists(
    st.tuples(st.sampled_from([{"pool": "a"}, {"pool": "b"}]), st.integers(min_value=8, max_value=256)),
    min_size=1,
    max_size=6,
)
models_st = st.lists(
    st.tuples(st.integers(min_value=1, max_value=160), st.sampled_from(range(len(POOLS)))),
    min_size=1,
    max_size=6,
)
requests_st = st.lists(st.tuples(st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=4)),
                       min_size=1, max_size=25)


def build(nodes, models):
    return ClusterView.build(
        nodes=[Node(f"n{i}", labels, cap * GI) for i, (labels, cap) in enumerate(nodes)],
        models=[Model("default", f"m{i}", mem * GI, f"m{i}", POOLS[p], 600.0, 0) for i, (mem, p) in enumerate(models)],
    )


def used_per_node(view):
    used = {}
    for p in view.placements:
        used[p.node] = used.get(p.node, 0) + p.memory_bytes
    return used


@settings(max_examples=300, deadline=None)
@given(nodes=nodes_st, models=models_st, requests=requests_st)
def test_admitted_placements_never_exceed_capacity(nodes, models, requests):
    view = build(nodes, models)
    serial = 0
    for model_index, replicas in requests:
        key = f"default/m{model_index % len(models)}"
        m = view.models[key]
        d = decide_scale(view, key, replicas, NOW)
        if not d.allowed:
            continue
        new = [
            Placement(f"default/p{serial + i}", node, m.memory_bytes, key, uid=f"p{serial + i}")
            for node, count in d.placements.items()
            for i in range(count)
        ]
        serial += len(new) + 1
        held = sum(1 for p in view.placements if p.model == key)
        placements = list(view.placements)
        if replicas < held:  # a decrease removes replicas
            drop = held - replicas
            kept = []
            for p in placements:
                if p.model == key and drop > 0:
                    drop -= 1
                    continue
                kept.append(p)
            placements = kept
        view = replace(view.with_model(replace(m, replicas=replicas)), placements=tuple(placements + new))
        for node in view.nodes:
            assert used_per_node(view).get(node.name, 0) <= node.capacity_bytes
            for p in view.placements:
                if p.node == node.name:
                    assert matches(view.models[p.model].node_selector, node.labels)


@settings(max_examples=300, deadline=None)
@given(
    nodes=nodes_st,
    models=models_st,
    existing=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=8),
    target=st.integers(0, 5),
)
def test_single_replica_denial_is_real(nodes, models, existing, target):
    """Deny 0->1 (nothing else pending) only if no node in the pool has room: no feasible node was missed."""
    view = build(nodes, models)
    placements = []
    free = {n.name: n.capacity_bytes for n in view.nodes}
    counts = {}
    for i, (mi, ni) in enumerate(existing):
        key = f"default/m{mi % len(models)}"
        node = view.nodes[ni % len(view.nodes)]
        mem = view.models[key].memory_bytes
        if free[node.name] >= mem and matches(view.models[key].node_selector, node.labels):
            free[node.name] -= mem
            placements.append(Placement(f"default/e{i}", node.name, mem, key, uid=f"e{i}"))
            counts[key] = counts.get(key, 0) + 1
    models_now = [replace(m, replicas=counts.get(m.key, 0)) for m in view.models.values()]
    view = replace(ClusterView.build(nodes=view.nodes, models=models_now), placements=tuple(placements))
    key = f"default/m{target % len(models)}"
    m = view.models[key]
    d = decide_scale(view, key, m.replicas + 1, NOW)
    feasible = [
        n.name for n in view.nodes if matches(m.node_selector, n.labels) and free[n.name] >= m.memory_bytes
    ]
    assert d.allowed == bool(feasible), (d.message, feasible)
    if not d.allowed:
        assert d.available_bytes == max(
            [free[n.name] for n in view.nodes if matches(m.node_selector, n.labels)], default=0
        )
