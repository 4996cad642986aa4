"""The engine tier's model generator: deterministic files, the sizes the budget tests are planned around,
a vocabulary llama.cpp accepts, and weights that keep special and byte tokens from ever being sampled."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.engine.make_gguf import (
    N_BYTES,
    N_SPECIAL,
    PRESETS,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    VOCAB_SIZE,
    Preset,
    vocabulary,
    write_model,
)

pytestmark = pytest.mark.unit

gguf = pytest.importorskip("gguf")
MICRO = Preset("micro", hidden=64, feed_forward=128, layers=2)
MB = 10**6


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("preset", "low_mb", "high_mb"),
    [
        pytest.param("tiny", 15, 25, id="tiny-about-20MB"),
        pytest.param("small", 180, 220, id="small-about-200MB"),
        pytest.param("medium", 550, 650, id="medium-about-600MB"),
    ],
)
def test_presets_have_clearly_different_sizes(preset: str, low_mb: int, high_mb: int) -> None:
    assert low_mb * MB <= PRESETS[preset].weight_bytes <= high_mb * MB


@pytest.mark.parametrize(
    ("seed_a", "seed_b", "same"),
    [pytest.param(0, 0, True, id="same-seed-same-bytes"), pytest.param(0, 1, False, id="other-seed-other-weights")],
)
def test_files_are_deterministic(tmp_path: Path, seed_a: int, seed_b: int, same: bool) -> None:
    a = write_model(tmp_path / "a.gguf", MICRO, seed=seed_a)
    b = write_model(tmp_path / "b.gguf", MICRO, seed=seed_b)
    assert (_digest(a) == _digest(b)) is same
    assert a.stat().st_size == b.stat().st_size


def test_file_is_the_weights_plus_a_small_header(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", MICRO)
    assert MICRO.weight_bytes < path.stat().st_size < MICRO.weight_bytes + 64 * 1024
    assert not list(tmp_path.glob("*.tmp")), "written atomically: no temporary file left"


def test_vocabulary_is_llama_style() -> None:
    tokens, scores, types = vocabulary()
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == VOCAB_SIZE
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[1:3] == [TOKEN_CONTROL, TOKEN_CONTROL]
    assert tokens[N_SPECIAL : N_SPECIAL + N_BYTES] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[N_SPECIAL : N_SPECIAL + N_BYTES]) == {TOKEN_BYTE}
    pieces = tokens[N_SPECIAL + N_BYTES :]
    assert set(types[N_SPECIAL + N_BYTES :]) == {TOKEN_NORMAL}
    assert all(p.replace("\u2581", "") for p in pieces), "no piece decodes to nothing but a space"


def test_written_file_reads_back_as_llama_with_banned_tokens_weighted_down(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_model(tmp_path / "m.gguf", MICRO))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * MICRO.layers
    out = np.asarray(tensors["output.weight"].data).reshape(VOCAB_SIZE, MICRO.hidden)
    banned = N_SPECIAL + N_BYTES
    assert (out[:banned, 0] < -10).all(), "special and byte tokens: large negative weight on the anchor"
    assert (out[banned:, 0] == 0).all(), "word pieces: no weight on the anchor"
    embd = np.asarray(tensors["token_embd.weight"].data).reshape(VOCAB_SIZE, MICRO.hidden)
    assert (embd[:, 0] > 10).all(), "every token carries the anchor"
