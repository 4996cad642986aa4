"""Properties of the decisions over random pools: admission never overcommits and never denies in vain; a node
passes the extender's filter iff the pod fits there after reservations; admission and the filter agree."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget import (
    REASON_INSUFFICIENT,
    REASON_NO_BUDGET,
    REASON_SELECTOR,
    ClusterView,
    Model,
    Node,
    Placement,
    PodRequest,
    Reservation,
    decide_scale,
    filter_nodes,
    score_nodes,
)
from budget.decide import REASON_UNKNOWN_NODE
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


# ---- the extender's node filter and scores over random nodes, placements and reservations ----

POD_UID = "pod-uid"
UIDS = [POD_UID, "u0", "u1", "u2", "u3", "u4", "u5"]  # reservations may share a UID with a placement (confirmed)
SELECTORS = [{}, {"pool": "a"}, {"pool": "b"}, {"pool": "a", "gpu": "h100"}]
LABELS = [{}, {"pool": "a"}, {"pool": "b"}, {"pool": "a", "gpu": "h100"}]
MAX_CAP = 4 * GI

filter_nodes_st = st.lists(
    st.tuples(st.sampled_from(range(len(LABELS))), st.one_of(st.none(), st.integers(0, MAX_CAP))),
    min_size=1,
    max_size=5,
)
held_st = st.lists(  # (node index, bytes, uid index, is a reservation, seconds until it expires)
    st.tuples(st.integers(0, 4), st.integers(0, GI), st.sampled_from(range(len(UIDS))), st.booleans(),
              st.sampled_from([-1.0, 0.0, 0.001, 30.0])),
    max_size=10,
)


def filter_view(nodes, held):
    built = [Node(f"n{i}", LABELS[li], cap) for i, (li, cap) in enumerate(nodes)]
    placements, reservations, placed_uids = [], [], set()
    for i, (ni, size, ui, is_reservation, ttl) in enumerate(held):
        node = f"n{ni % len(nodes)}"
        if is_reservation:
            reservations.append(Reservation(UIDS[ui], "default/m", size, NOW + ttl, node))
        elif UIDS[ui] not in placed_uids:  # a pod UID is bound to one node at most
            placed_uids.add(UIDS[ui])
            placements.append(Placement(f"default/h{i}", node, size, "default/m", uid=UIDS[ui]))
    return built, placements, reservations


def held_bytes(node, placements, reservations):
    """What a user would add up: bound model pods plus unexpired promises to pods not bound yet, minus this pod."""
    placed_uids = {p.uid for p in placements}
    bound = sum(p.memory_bytes for p in placements if p.node == node and p.uid != POD_UID)
    promised = sum(
        r.memory_bytes
        for r in reservations
        if r.node == node and r.expires_at > NOW and r.uid != POD_UID and r.uid not in placed_uids
    )
    return bound + promised


@settings(max_examples=300, deadline=None)
@given(
    nodes=filter_nodes_st,
    held=held_st,
    model_selector=st.sampled_from(range(len(SELECTORS))),
    pod_selector=st.sampled_from(range(len(SELECTORS))),
    data=st.data(),
)
def test_a_node_passes_iff_the_pod_fits_there_after_reservations(nodes, held, model_selector, pod_selector, data):
    built, placements, reservations = filter_view(nodes, held)
    view = ClusterView.build(
        nodes=built,
        models=[Model("default", "m", GI, "m", SELECTORS[model_selector], 600.0, 1)],
        placements=placements,
        reservations=reservations,
    )
    frees = [
        n.capacity_bytes - held_bytes(n.name, placements, reservations) for n in built if n.capacity_bytes is not None
    ]
    # Half the pods are sized at some node's edge (its free memory, one byte either side), not by chance.
    need = data.draw(
        st.one_of(
            st.integers(0, MAX_CAP + 1),
            st.tuples(st.sampled_from(frees or [0]), st.sampled_from([-1, 0, 1])).map(lambda t: max(0, sum(t))),
        ),
        label="need",
    )
    pod = PodRequest("default", "m-x", POD_UID, "default/m", need, SELECTORS[pod_selector])
    selector = {**SELECTORS[model_selector], **SELECTORS[pod_selector]}
    names = [n.name for n in built] + ["ghost"]
    verdicts = filter_nodes(view, pod, names, NOW)
    assert [v.node for v in verdicts] == names
    for node, v in zip([*built, None], verdicts, strict=True):
        if node is None:
            assert (v.status, v.reason) == ("unresolvable", REASON_UNKNOWN_NODE)
            continue
        if node.capacity_bytes is None:
            assert (v.status, v.reason) == ("unresolvable", REASON_NO_BUDGET)
            continue
        if not matches(selector, node.labels):
            assert (v.status, v.reason) == ("unresolvable", REASON_SELECTOR)
            continue
        free = node.capacity_bytes - held_bytes(node.name, placements, reservations)
        assert v.free_bytes == free and v.capacity_bytes == node.capacity_bytes
        if need <= free:
            assert (v.status, v.reason) == ("passed", ""), (need, free)
        elif need > node.capacity_bytes:
            assert (v.status, v.reason) == ("unresolvable", REASON_INSUFFICIENT), "would not fit even empty"
        else:
            assert (v.status, v.reason) == ("failed", REASON_INSUFFICIENT), (need, free)

    pack, spread = score_nodes(verdicts, need, "binpack"), score_nodes(verdicts, need, "spread")
    assert set(pack) == set(spread) == set(names)
    for v in verdicts:
        if v.status != "passed" or v.capacity_bytes == 0:
            assert pack[v.node] == spread[v.node] == 0
            continue
        used_after = 1 - (v.free_bytes - need) / v.capacity_bytes  # the share of the node in use once it lands
        assert abs(pack[v.node] - 10 * used_after) <= 0.5 + 1e-9, (pack[v.node], used_after)
        assert pack[v.node] + spread[v.node] == 10, "spread is binpack mirrored"


@settings(max_examples=200, deadline=None)
@given(nodes=filter_nodes_st, held=held_st, model_selector=st.sampled_from(range(len(SELECTORS))),
       memory=st.integers(1, MAX_CAP))
def test_admission_and_the_node_filter_agree_on_one_replica(nodes, held, model_selector, memory):
    """The proxy/webhook and the extender ask one core: a first replica is admitted iff some node passes."""
    built, placements, reservations = filter_view(nodes, held)
    # Admission has no pod yet: nothing is held under the pod's own UID.
    placements = [p for p in placements if p.uid != POD_UID]
    reservations = [r for r in reservations if r.uid != POD_UID]
    view = ClusterView.build(
        nodes=built,
        models=[Model("default", "m", memory, "m", SELECTORS[model_selector], 600.0, 0)],
        placements=[replace(p, model="default/other") for p in placements],
        reservations=[replace(r, model="default/other") for r in reservations],
    )
    d = decide_scale(view, "default/m", 1, NOW)
    pod = PodRequest("default", "m-x", POD_UID, "default/m", memory)
    passing = {v.node for v in filter_nodes(view, pod, [n.name for n in built], NOW) if v.status == "passed"}
    assert d.allowed == bool(passing), (d.message, passing)
    assert set(d.placements) <= passing
