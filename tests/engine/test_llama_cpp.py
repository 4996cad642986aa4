"""`ibc local` in front of a real inference engine: llama.cpp's OpenAI server on GGUF models the project
makes, driven by the official `openai` client, as a user would run it.

Three models (tiny ~18 MB, small ~200 MB, medium ~600 MB of weights) in a budget where any two fit and
all three do not. What a user would notice: a cold start through ibc costs what starting the engine by
hand costs; streams arrive token by token; the third model gets the explained 429 at once and is served
once a cooldown frees the room; observed memory is the engine's RSS and advice follows from it; an
engine killed mid-stream gives the client an explicit error and the next request a new engine; an
engine killed after reading a request is not sent that request again; a corrupt model file is a 503
that carries the engine's own reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from budget import parse_quantity
from local.runtime import FORWARDED_LINES
from tests.engine.conftest import (
    MI,
    LocalIbc,
    alive,
    cpu_seconds,
    free_port,
    rss_bytes,
    wait_for,
)
from tests.engine.parts import engine_argv

pytestmark = pytest.mark.engine

# Declared memory: above what each engine uses (weights are memory-mapped and count in its RSS).
DECLARED_MI = {"tiny": 256, "small": 512, "medium": 1024}
CAPACITY_MI = 1600  # any two fit (at most 1536Mi), all three do not (1792Mi)
START_SECONDS = 120  # an engine's load is seconds; generous for a machine shared with builds
MESSAGES = [{"role": "user", "content": "tell me about the sea"}]


def config(python: str, files: dict[str, Path], *, cooldown: str = "10m", extra: str = "") -> str:
    lines = [f"nodes:\n  - {{name: machine, memory: {CAPACITY_MI}Mi}}\nmodels:"]
    for name, path in files.items():
        argv = engine_argv(python, path, "{port}", "{model}")
        lines.append(
            f"  - name: {name}\n    memory: {DECLARED_MI.get(name, 256)}Mi\n    cooldown: {cooldown}\n"
            f"    health: /v1/models\n    startup_timeout: {START_SECONDS}s\n    stop_grace_period: 10s\n"
            f"    command: {json.dumps(argv)}"
        )
    return "\n".join(lines) + "\n" + extra


def complete(client: openai.OpenAI, model: str, max_tokens: int = 2) -> str:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length", "special tokens are never sampled: no early stop"
    return reply.choices[0].message.content or ""


def test_cold_start_through_ibc_costs_what_the_engine_start_costs(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    # By hand: start the engine, poll its /v1/models, send the first request.
    port = free_port()
    started = time.monotonic()
    with (tmp_path / "by-hand.log").open("wb") as log:
        engine = subprocess.Popen(
            engine_argv(engine_python, models["small"], port, "small"), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        hand = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert engine.poll() is None, (tmp_path / "by-hand.log").read_text()
                return False

        wait_for(answers, START_SECONDS, "the engine started by hand")
        complete(hand, "small")
        by_hand = time.monotonic() - started
    finally:
        engine.terminate()
        engine.wait(timeout=30)

    ibc = LocalIbc(tmp_path, config(engine_python, {"small": models["small"]}))
    local_ibc.append(ibc)
    started = time.monotonic()
    complete(ibc.client(), "small")
    through_ibc = time.monotonic() - started
    figures = f"cold start to first reply: by hand {by_hand:.2f}s, through ibc {through_ibc:.2f}s"
    print(figures)
    # Not a benchmark (bench/engine_bench.py measures it): a guard against ibc adding seconds of its own.
    assert through_ibc < by_hand * 2 + 2, figures


def test_stream_arrives_token_by_token_as_whole_utf8_chunks(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    ibc = LocalIbc(tmp_path, config(engine_python, {"medium": models["medium"]}))
    local_ibc.append(ibc)
    complete(ibc.client(), "medium")  # cold start out of the way
    max_tokens = 24
    sent = time.monotonic()
    stream = ibc.client().chat.completions.create(
        model="medium",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        stream=True,
    )
    arrivals: list[tuple[float, str]] = []
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            arrivals.append((time.monotonic(), choice.delta.content))
        finish = choice.finish_reason or finish
    assert len(arrivals) == max_tokens, [text for _, text in arrivals]
    assert finish == "length"
    assert all(isinstance(text, str) and "\ufffd" not in text for _, text in arrivals)
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first > 0.3 * (last - sent), "chunks arrived as generated, not all at the end"


def test_third_model_gets_the_explained_429_and_is_served_after_a_cooldown(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    ibc = LocalIbc(tmp_path, config(engine_python, models, cooldown="6s"))
    local_ibc.append(ibc)
    client = ibc.client()
    for name in ("small", "medium"):
        complete(client, name)
    holders = {name: ibc.engine_pids(models[name]) for name in ("small", "medium")}
    assert all(len(pids) == 1 for pids in holders.values()), holders

    started = time.monotonic()
    response = httpx.post(
        f"{ibc.url}/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2}, timeout=10
    )
    took_ms = (time.monotonic() - started) * 1000
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"]["code"] == "insufficient_memory", body
    blocking = {b["model"].rsplit("/", 1)[-1] for b in body["blocking"]}
    assert blocking and blocking <= {"small", "medium"}, body
    assert int(response.headers["Retry-After"]) >= 1
    assert took_ms < 1000, f"the 429 took {took_ms:.0f} ms"
    with pytest.raises(openai.RateLimitError):
        complete(client, "tiny")

    # Cooldown: both engines exit on their own and the memory is free for the third model.
    for name, pids in holders.items():
        wait_for(lambda pids=pids: not any(alive(p) for p in pids), 60, f"{name}'s engine to stop after its cooldown")
        # ibc frees the memory once it has seen the exit (its supervisor polls): wait on ibc's own word.
        wait_for(lambda name=name: ibc.metrics(name)["state"] == "stopped", 10, f"ibc to see {name} stopped")
    assert complete(client, "tiny")
    assert "idle for" in ibc.full_log() and "stopping it to free" in ibc.full_log()


def test_observed_memory_is_the_engine_rss_and_advice_follows(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    ibc = LocalIbc(tmp_path, config(engine_python, {"medium": models["medium"]}))
    local_ibc.append(ibc)
    complete(ibc.client(), "medium")
    (pid,) = ibc.engine_pids(models["medium"])
    answered = time.time()

    def observed_after_the_request() -> dict | None:  # type: ignore[type-arg]
        body = ibc.metrics("medium")
        last = body.get("lastObservation")
        if last is None:
            return None
        seen = time.mktime(time.strptime(last, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        return body if seen >= int(answered) + 1 else None

    body = wait_for(observed_after_the_request, 30, "a memory observation after the first reply", interval=0.5)
    rss = rss_bytes(pid)
    observed = body["observedMemoryBytes"]
    assert body["source"] == "rss"
    assert abs(observed - rss) <= 0.05 * rss, f"observed {observed / MI:.0f}Mi, ps says {rss / MI:.0f}Mi"
    weights = models["medium"].stat().st_size
    assert observed >= weights * 0.9, "the memory-mapped weights count: the engine has read them all"
    assert body["observedPeakMemoryBytes"] >= observed
    # Declared 1Gi for ~0.7Gi used: the advice says so, in the metrics and once in ibc's log.
    assert body["log"] and Path(body["log"]).read_text().count("llama_model_loader") > 20, "the engine's own log"
    assert ibc.full_log().count("medium | ") <= FORWARDED_LINES + 1, "ibc's log keeps only the first lines"
    assert "Consider reducing memory" in (body["recommendation"] or ""), body
    assert 0 < parse_quantity(body["recommendedMemory"]) < DECLARED_MI["medium"] * MI, body
    assert "medium declared 1Gi but observed peak is" in ibc.full_log()


def _medium_running(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> tuple[LocalIbc, openai.OpenAI, int]:
    """ibc local with the medium model started and answered once (a keep-alive connection to it left open)."""
    ibc = LocalIbc(tmp_path, config(engine_python, {"medium": models["medium"]}))
    local_ibc.append(ibc)
    client = ibc.client()
    complete(client, "medium")
    (pid,) = ibc.engine_pids(models["medium"])
    return ibc, client, pid


def _kill_when_busy(pid: int, cpu_before: float) -> None:
    """SIGKILL `pid` once it has spent a little CPU on the request in flight (it is generating)."""
    wait_for(lambda: cpu_seconds(pid) - cpu_before >= 0.2, 60, "the engine to work on the request")
    os.kill(pid, signal.SIGKILL)


def test_engine_killed_mid_stream_is_an_explicit_stream_error_and_the_next_request_restarts_it(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    ibc, client, pid = _medium_running(engine_python, models, tmp_path, local_ibc)
    stream = client.chat.completions.create(
        model="medium",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=400,
        stream=True,
    )
    received = 0
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 3:
                    os.kill(pid, signal.SIGKILL)
    assert 3 <= received < 400
    assert "broke the stream" in str(caught.value), caught.value
    wait_for(lambda: not alive(pid), 10, "the killed engine to be gone")
    failure = wait_for(lambda: ibc.metrics("medium")["lastFailure"], 10, "lastFailure")
    assert "killed by SIGKILL" in failure, failure

    assert complete(client, "medium"), "the next request starts a new engine and is served"
    (new_pid,) = ibc.engine_pids(models["medium"])
    assert new_pid != pid


def test_engine_killed_after_reading_a_request_is_not_sent_it_again(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    ibc, client, pid = _medium_running(engine_python, models, tmp_path, local_ibc)
    killer = threading.Thread(target=_kill_when_busy, args=(pid, cpu_seconds(pid)), daemon=True)
    killer.start()
    with pytest.raises(openai.APIStatusError) as caught:
        complete(client, "medium", max_tokens=400)
    killer.join(timeout=60)
    assert caught.value.status_code == 502, caught.value
    message = str(caught.value)
    # Re-sent on a fresh connection, it would have met a dead port: "connection refused". The kernel
    # closes the dead engine's socket with a FIN or, with bytes unread, a RST: both are reported as such.
    assert "refused" not in message, message
    assert "not re-sent" in message or "Connection reset by peer" in message, message
    assert ibc.full_log().count("upstream failure for medium") == 1
    wait_for(lambda: not alive(pid), 10, "the killed engine to be gone")
    assert complete(client, "medium"), "the next request starts a new engine and is served"


def test_corrupt_model_file_is_a_503_with_the_engine_reason(
    engine_python: str, models: dict[str, Path], tmp_path: Path, local_ibc: list[LocalIbc]
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(models["tiny"].read_bytes()[: 4 * MI])  # a valid header, the weights cut short
    ibc = LocalIbc(tmp_path, config(engine_python, {"broken": corrupt}))
    local_ibc.append(ibc)
    with pytest.raises(openai.APIStatusError) as caught:
        complete(ibc.client(), "broken")
    assert caught.value.status_code == 503
    message = str(caught.value)
    assert "could not start broken" in message and "exited with code" in message, message
    # llama.cpp's own words from its stderr, not ibc's paraphrase nor an unrelated stdout line.
    assert "error loading model" in message and "Failed to load model from file" in message, message
    failure = ibc.metrics("broken")["lastFailure"]
    assert failure and failure in message, failure
