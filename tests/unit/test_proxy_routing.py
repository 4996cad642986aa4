"""Prefix-affinity routing: which replica a request goes to, from the prefixes replicas served and their load."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from budget import ClusterView, Model, Node
from proxy.app import create_app
from proxy.routing import PrefixRouter, Routing, random_pick, rendezvous, routing_of
from proxy.settings import ProxySettings, SettingsError
from proxy.static_scaler import StaticScaler
from serving.prompt import BLOCK_BYTES, block_count, prefix_keys, prompt_bytes, prompt_text, token_count

pytestmark = pytest.mark.unit

BACKENDS = ["a", "b", "c"]
P1, P2, P3, X, R = (bytes([i]) * 8 for i in range(1, 6))  # block keys; P1 then P2 then P3 is one prompt


def only(free: str) -> dict[str, int]:
    """In-flight counts with every replica but `free` far busier: a pick must take `free`."""
    return {b: 0 if b == free else 10 for b in BACKENDS}


IDLE: dict[str, int] = {}


@pytest.mark.parametrize(
    ("history", "keys", "outstanding", "expected", "max_in_flight"),
    [
        pytest.param([], [P1, P2], IDLE, ("rendezvous", "new"), None, id="unseen-goes-to-its-rendezvous-replica"),
        pytest.param([([P1, P2], only("b"))], [P1, P2], IDLE, ("b", "affinity"), None, id="served-last-keeps-it"),
        pytest.param(
            [([P1, P2], only("b"))], [P1, P2, R], IDLE, ("b", "affinity"), None, id="shared-leading-blocks-follow"
        ),
        pytest.param(
            [([P1, P2], only("b")), ([P1, X], only("c"))],
            [P1, P2, P3],
            IDLE,
            ("b", "affinity"),
            None,
            id="longest-match-wins",
        ),
        pytest.param([([P1, X], only("c"))], [P1, P2], IDLE, ("c", "affinity"), None, id="shorter-match-counts"),
        pytest.param([([P1], only("b"))], [P1], {"b": 3}, ("b", "affinity"), None, id="a-little-busier-keeps-it"),
        pytest.param([([P1], only("b"))], [P1], {"b": 4}, ("a", "yielded"), None, id="far-busier-yields"),
        pytest.param(
            [([P1], only("b"))], [P1], {"b": 2, "a": 1, "c": 0}, ("c", "yielded"), 2, id="saturated-yields"
        ),
        pytest.param(
            [([P1], only("b"))], [P1], {"b": 1, "a": 1, "c": 0}, ("b", "affinity"), 2, id="below-saturation-keeps-it"
        ),
        pytest.param(
            [([P1], only("b")), ([P1], {"b": 9})], [P1], IDLE, ("a", "affinity"), None, id="yielded-is-the-new-home"
        ),
    ],
)
def test_pick(
    history: list[tuple[list[bytes], dict[str, int]]],
    keys: list[bytes],
    outstanding: dict[str, int],
    expected: tuple[str, str],
    max_in_flight: int | None,
) -> None:
    router = PrefixRouter(imbalance=4, max_in_flight=max_in_flight)
    for earlier, load in history:
        router.pick(earlier, BACKENDS, load)
    backend, outcome = expected
    if backend == "rendezvous":
        backend = rendezvous(keys[0], BACKENDS)
    assert router.pick(keys, BACKENDS, outstanding) == (backend, outcome)


def test_an_unseen_prefix_goes_where_every_worker_sends_it() -> None:
    """Two workers (two routers) that never talk send a new prefix to the same replica; prefixes spread."""
    prefixes = [bytes([i]) * 8 for i in range(60)]
    first = [PrefixRouter().pick([p], BACKENDS, IDLE)[0] for p in prefixes]
    second = [PrefixRouter().pick([p], BACKENDS, IDLE)[0] for p in prefixes]
    assert first == second
    assert {b: first.count(b) for b in BACKENDS} == {b: pytest.approx(20, abs=10) for b in BACKENDS}


def test_a_replica_that_left_loses_its_prefixes() -> None:
    router = PrefixRouter()
    router.pick([P1], BACKENDS, only("b"))
    assert router.pick([P1], ["a", "c"], IDLE) == (rendezvous(P1, ["a", "c"]), "new")


def test_tables_are_bounded_per_replica_and_forget_the_oldest() -> None:
    router = PrefixRouter(entries_per_replica=3)
    keys = [bytes([i]) * 8 for i in range(10)]
    for key in keys:
        router.pick([key], BACKENDS, only("b"))
    assert router.size() == 3
    assert router.pick([keys[-1]], BACKENDS, IDLE) == ("b", "affinity"), "the most recent ones are remembered"
    assert router.pick([keys[0]], BACKENDS, IDLE) == (rendezvous(keys[0], BACKENDS), "new"), "the oldest is forgotten"


def test_replicas_that_come_and_go_do_not_grow_the_tables() -> None:
    router = PrefixRouter()
    for i in range(500):  # a new pod IP every time, as replicas are replaced
        backends = [f"10.0.{i}.1", f"10.0.{i}.2"]
        router.pick([bytes([i % 256]) * 8], backends, IDLE)
    assert len(router._tables) <= 4 * 2 + 16
    assert router.size() <= len(router._tables)


LONG = "x" * BLOCK_BYTES * 2
CHAT = {"model": "m", "messages": [{"role": "user", "content": LONG}]}


@pytest.mark.parametrize(
    ("routing", "payload", "backends", "expected"),
    [
        pytest.param("prefix", CHAT, BACKENDS, "prefix", id="prefix-with-a-full-block"),
        pytest.param("prefix", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, BACKENDS, None,
                     id="prefix-short-prompt-is-least-outstanding"),
        pytest.param("prefix", {"model": "m", "input": LONG}, BACKENDS, None, id="prefix-embeddings-no-prompt"),
        pytest.param("prefix", CHAT, ["a"], None, id="one-replica-no-choice"),
        pytest.param("least-outstanding", CHAT, BACKENDS, None, id="least-outstanding"),
        pytest.param("random", CHAT, BACKENDS, "random", id="random"),
    ],
)
def test_routing_for_request(routing: str, payload: dict[str, Any], backends: list[str], expected: Any) -> None:
    pick = routing_of(ProxySettings(routing=routing)).for_request(payload, backends)
    if expected is None:
        assert pick is None
    elif expected == "random":
        assert pick is random_pick
    else:
        assert pick is not None
        chosen = pick(backends, IDLE)
        assert pick(backends, {chosen: 1}) == chosen, "the same prompt again: the same replica"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"routing": "round-robin"}, "routing must be", id="unknown-routing"),
        pytest.param({"prefix_imbalance": 0}, "imbalance", id="no-imbalance"),
        pytest.param({"prefix_max_in_flight": 0}, "max in flight", id="zero-max-in-flight"),
    ],
)
def test_settings_refuse(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ProxySettings(**changes)


def test_routing_needs_its_router() -> None:
    with pytest.raises(ValueError, match="PrefixRouter"):
        Routing("prefix")


@pytest.mark.parametrize(
    ("body", "text"),
    [
        pytest.param(
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
            "<system>S<user>U",
            id="chat-roles-and-text-in-order",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image_url"}]}]},
            "<user>A",
            id="chat-content-parts-text-only",
        ),
        pytest.param({"messages": ["junk", {"content": 5}]}, "<>", id="chat-malformed-ignored"),
        pytest.param({"prompt": "P"}, "P", id="completion-prompt"),
        pytest.param({"prompt": ["P", "Q"]}, "P", id="completion-batch-first-prompt"),
        pytest.param({"prompt": [1, 2, 3]}, "1 2 3", id="completion-token-ids"),
        pytest.param({"input": "I"}, "", id="embeddings-none"),
        pytest.param({"prompt": {"x": 1}}, "", id="wrong-type-none"),
    ],
)
def test_prompt_text(body: dict[str, Any], text: str) -> None:
    assert prompt_text(body) == text


@pytest.mark.parametrize(
    ("text", "blocks", "count"),
    [
        pytest.param("", range(1, 5), 0, id="empty"),
        pytest.param("x" * (BLOCK_BYTES - 1), range(1, 5), 0, id="partial-block-has-no-key"),
        pytest.param("x" * BLOCK_BYTES * 3 + "y", range(1, 5), 3, id="full-blocks-only"),
        pytest.param("x" * BLOCK_BYTES * 40, range(1, 17), 16, id="leading-blocks-only"),
        pytest.param("x" * BLOCK_BYTES * 40, [1, 2, 4, 8, 16], 5, id="chosen-lengths"),
        pytest.param("é" * BLOCK_BYTES, [1, 2, 3], 2, id="blocks-are-utf8-bytes"),
        pytest.param("\ud800" * BLOCK_BYTES, [1, 2, 3], 3, id="lone-surrogates-from-json-are-bytes-too"),
    ],
)
def test_prefix_keys_count(text: str, blocks: list[int], count: int) -> None:
    assert len(prefix_keys(text, blocks)) == count


def test_a_key_covers_the_whole_prefix_up_to_its_block() -> None:
    a, b = "a" * BLOCK_BYTES, "b" * BLOCK_BYTES
    assert prefix_keys(a + b, [1]) == prefix_keys(a + a, [1]), "same first block, same first key"
    assert prefix_keys(a + b, [1, 2])[1] != prefix_keys(b + b, [1, 2])[1], "same block after another, other key"
    assert prefix_keys(a + b + a, [1, 2, 3])[1:] == prefix_keys(a + b + a, [2, 3]), "a key does not depend on others"


@pytest.mark.parametrize(
    ("text", "blocks", "tokens"),
    [
        pytest.param("", 0, 0, id="empty"),
        pytest.param("x", 1, 1, id="one-partial"),
        pytest.param("x" * BLOCK_BYTES, 1, 16, id="one-full"),
        pytest.param("x" * BLOCK_BYTES + "é", 2, 17, id="multibyte-counts-bytes"),
        pytest.param("é" * BLOCK_BYTES, 2, 32, id="a-cached-block-never-has-more-tokens-than-it-holds"),
    ],
)
def test_block_and_token_counts(text: str, blocks: int, tokens: int) -> None:
    size = prompt_bytes(text)
    assert (block_count(size), token_count(size)) == (blocks, tokens)


ODD = "é\ud800x" * 40  # multibyte and a lone surrogate, as JSON allows


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": "not a list"}, id="messages-a-string"),
        pytest.param({"messages": [{"role": 5, "content": {"text": ODD}}]}, id="content-an-object"),
        pytest.param({"messages": [{"role": "user", "content": [{"text": ODD}, "x", None]}]}, id="parts-mixed"),
        pytest.param({"messages": [{"role": "user", "content": ODD}]}, id="odd-text"),
        pytest.param({"prompt": [[1, 2], None, {"a": 1}]}, id="prompt-nested-junk"),
        pytest.param({"prompt": ODD}, id="prompt-odd-text"),
    ],
)
def test_odd_prompts_through_the_proxy_are_routed_not_500(body: dict[str, Any]) -> None:
    """Whatever the prompt fields hold, a model with several replicas answers (the backend decides what is
    valid), and the same body goes to the same replica."""
    view = ClusterView.build(nodes=[Node("n", {}, 2**40, "annotation")], models=[Model("default", "m", 2**30, "m")])
    replicas = [f"http://10.0.0.{i}:8000" for i in range(3)]
    scaler = StaticScaler(view, {"default/m": replicas})
    served = []

    def backend(request: httpx.Request) -> httpx.Response:
        served.append(request.url.host)
        return httpx.Response(200, json={"object": "chat.completion"})

    app = create_app(ProxySettings(), scaler, transport=httpx.MockTransport(backend))
    client = app.test_client()
    raw = json.dumps({"model": "m", **body})
    for _ in range(3):
        response = client.post("/v1/chat/completions", data=raw, content_type="application/json")
        assert response.status_code == 200, response.get_data(as_text=True)
    if prefix_keys(prompt_text(json.loads(raw)), [1]):
        assert len(set(served)) == 1, "a prompt with a full block sticks to one replica"
