"""Properties of the per-device decision over random GPU nodes and tensor-parallel models: no device ever
holds more than its memory, a single replica is denied only when no node has the devices for it, and the
extender's filter passes a node iff the pod's devices fit there."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget import ClusterView, Device, Model, Node, Placement, PodRequest, decide_scale, filter_nodes
from budget.view import device_matches, share_bytes

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 10_000.0
PROFILES = ["", "1g.10gb", "3g.40gb"]
SELECTORS = [{}, {"profile": "1g.10gb"}, {"profile": "3g.40gb"}]

devices_st = st.lists(st.tuples(st.integers(1, 80), st.sampled_from(range(len(PROFILES)))), min_size=1, max_size=4)
nodes_st = st.lists(devices_st, min_size=1, max_size=4)
models_st = st.lists(
    st.tuples(st.integers(1, 120), st.integers(1, 3), st.sampled_from(range(len(SELECTORS)))), min_size=1, max_size=5
)
requests_st = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=20)


def build(nodes, models) -> ClusterView:
    return ClusterView.build(
        nodes=[
            Node(f"n{i}", {}, None, "devices-annotation",
                 tuple(Device(j, mem * GI, "mig" if p else "gpu", PROFILES[p]) for j, (mem, p) in enumerate(devs)))
            for i, devs in enumerate(nodes)
        ],
        models=[
            Model("default", f"m{i}", mem * GI, f"m{i}", {}, 600.0, 0, devices=k, device_selector=SELECTORS[s])
            for i, (mem, k, s) in enumerate(models)
        ],
    )


def device_load(view: ClusterView) -> dict[tuple[str, int], int]:
    load: dict[tuple[str, int], int] = {}
    for p in view.placements:
        for i in p.devices:
            load[p.node, i] = load.get((p.node, i), 0) + share_bytes(p.memory_bytes, len(p.devices))
    return load


@settings(max_examples=300, deadline=None)
@given(nodes=nodes_st, models=models_st, requests=requests_st)
def test_no_device_ever_holds_more_than_its_memory(nodes, models, requests):
    view = build(nodes, models)
    serial = 0
    for model_index, replicas in requests:
        key = f"default/m{model_index % len(models)}"
        m = view.models[key]
        d = decide_scale(view, key, replicas, NOW)
        if not d.allowed or replicas < m.replicas:
            continue
        new = []
        for slot in d.device_placements:
            serial += 1
            node = view.node_index[slot.node]
            assert len(set(slot.devices)) == m.devices, "a replica takes exactly its devices, each once"
            assert all(device_matches(m.device_selector, node.device(i)) for i in slot.devices)
            new.append(Placement(f"default/p{serial}", slot.node, m.memory_bytes, key, uid=f"p{serial}",
                                 devices=slot.devices))
        assert sum(d.placements.values()) == len(new)
        view = replace(view.with_model(replace(m, replicas=replicas)), placements=view.placements + tuple(new))
        for (node, index), load in device_load(view).items():
            capacity = view.node_index[node].device(index)
            assert capacity is not None and load <= capacity.memory_bytes, (node, index, load)


def feasible(view: ClusterView, m: Model) -> list[str]:
    """Brute force: nodes with `m.devices` matching devices that each have the share free."""
    load = device_load(view)
    need = share_bytes(m.memory_bytes, m.devices)
    out = []
    for n in view.nodes:
        room = [d for d in n.devices
                if device_matches(m.device_selector, d) and d.memory_bytes - load.get((n.name, d.index), 0) >= need]
        if len(room) >= m.devices:
            out.append(n.name)
    return out


@settings(max_examples=300, deadline=None)
@given(nodes=nodes_st, models=models_st, existing=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3),
                                                                     st.integers(0, 3)), max_size=8),
       target=st.integers(0, 4))
def test_no_single_replica_placement_is_missed(nodes, models, existing, target):
    """Deny 0->1 more (nothing else pending) only if no node has the devices: no feasible placement missed."""
    view = build(nodes, models)
    placements: list[Placement] = []
    counts: dict[str, int] = {}
    for i, (mi, ni, first) in enumerate(existing):
        m = view.models[f"default/m{mi % len(models)}"]
        node = view.nodes[ni % len(view.nodes)]
        chosen = tuple(sorted({(first + j) % len(node.devices) for j in range(m.devices)}))
        trial = replace(view, placements=(*placements, Placement(f"default/e{i}", node.name, m.memory_bytes, m.key,
                                                                    uid=f"e{i}", devices=chosen)))
        fits = len(chosen) == m.devices and all(
            device_matches(m.device_selector, node.device(j))
            and device_load(trial).get((node.name, j), 0) <= node.device(j).memory_bytes  # type: ignore[union-attr]
            for j in chosen
        )
        if fits:
            placements = list(trial.placements)
            counts[m.key] = counts.get(m.key, 0) + 1
    models_now = [replace(m, replicas=counts.get(m.key, 0)) for m in view.models.values()]
    view = replace(ClusterView.build(nodes=view.nodes, models=models_now), placements=tuple(placements))
    m = view.models[f"default/m{target % len(models)}"]
    d = decide_scale(view, m.key, m.replicas + 1, NOW)
    where = feasible(view, m)
    assert d.allowed == bool(where), (d.message, where)
    pod = PodRequest("default", "new", "new-uid", m.key, m.memory_bytes)
    passed = [v.node for v in filter_nodes(view, pod, [n.name for n in view.nodes], NOW) if v.status == "passed"]
    assert passed == where, "the extender's filter and the brute force agree"
