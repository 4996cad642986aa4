"""Real GGUF models the project makes itself, for the engine tier and the engine bench: nothing is downloaded.

A LLaMA-architecture file with seeded random F32 weights and a minimal SentencePiece-style vocabulary
(`<unk>`, `<s>`, `</s>`, the 256 byte tokens and a few hundred word pieces) is all llama.cpp needs to load
a model, stream tokens and use the memory a model of that size uses. Presets of clearly different sizes
let a test put several models in one memory budget.

Two properties the tests rely on, built into the weights rather than asked of each client:
- every generated token is a word piece: `<unk>`, `<s>`, `</s>` and the byte tokens can never be sampled
  (hidden dimension 0 carries a large constant that no layer writes to, and their output rows weigh it
  negatively), so a reply never ends early and every streamed chunk is whole UTF-8: a completion of
  `max_tokens` tokens arrives as exactly `max_tokens` content chunks;
- the same preset and seed give the same bytes (same weights, same metadata order).

Usage: python -m tests.engine.make_gguf DIR [--preset tiny|small|medium ...] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_SPECIAL = 3  # <unk>, <s>, </s>
N_BYTES = 256
VOCAB_SIZE = 512
CONTEXT_LENGTH = 2048
HEAD_DIM = 64
ANCHOR = 64.0
"""The constant in hidden dimension 0: large enough to dominate the RMS norm of random activations."""
BANNED_LOGIT_WEIGHT = -100.0
"""Output weight of banned tokens on dimension 0: their logits sit far below every word piece's."""

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


@dataclass(frozen=True)
class Preset:
    """A model shape: hidden size, feed-forward size and layers; F32, so bytes = 4 x parameters."""

    name: str
    hidden: int
    feed_forward: int
    layers: int

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor's name and numpy shape (GGUF stores the dimensions reversed)."""
        h, ff = self.hidden, self.feed_forward
        shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (VOCAB_SIZE, h))]
        for i in range(self.layers):
            shapes += [
                (f"blk.{i}.attn_norm.weight", (h,)),
                (f"blk.{i}.attn_q.weight", (h, h)),
                (f"blk.{i}.attn_k.weight", (h, h)),
                (f"blk.{i}.attn_v.weight", (h, h)),
                (f"blk.{i}.attn_output.weight", (h, h)),
                (f"blk.{i}.ffn_norm.weight", (h,)),
                (f"blk.{i}.ffn_gate.weight", (ff, h)),
                (f"blk.{i}.ffn_up.weight", (ff, h)),
                (f"blk.{i}.ffn_down.weight", (h, ff)),
            ]
        shapes += [("output_norm.weight", (h,)), ("output.weight", (VOCAB_SIZE, h))]
        return shapes

    @property
    def weight_bytes(self) -> int:
        """Bytes of tensor data (F32): the file is this plus a small header and alignment."""
        return sum(4 * int(np.prod(shape)) for _, shape in self.tensor_shapes())


PRESETS = {
    p.name: p
    for p in (
        Preset("tiny", hidden=256, feed_forward=1024, layers=4),  # ~18 MB
        Preset("small", hidden=512, feed_forward=7424, layers=4),  # ~201 MB
        Preset("medium", hidden=1024, feed_forward=10752, layers=4),  # ~600 MB
    )
}


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: the specials, the 256 byte tokens, then word pieces up to VOCAB_SIZE."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTES)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * N_BYTES
    pieces: list[str] = []
    words = (
        "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
        "hot word but what some we can out other were all there when up use your how said an each she which do "
        "their time if will way about many then them write would like so these her long make thing see him two "
        "has look more day could go come did number sound no most people my over know water than call first who "
        "may down side been now find any new work part take get place made live where after back little only "
        "round man year came show every good me give our under name very through just form sentence great think "
        "say help low line differ turn cause much mean before move right boy old too same tell does set three "
        "want air well also play small end put home read hand port large spell add even land here must big high "
        "such follow act why ask men change went light kind off need house picture try us again animal point "
        "mother world near build self earth father head stand own page should country found answer school grow "
        "study still learn plant cover food sun four between state keep eye never last let thought city tree"
    ).split()
    seen: set[str] = set(tokens)
    # Letters first, so any ASCII prompt tokenizes without byte fallback; then whole words.
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'-()":
        for piece in (ch, "\u2581" + ch):
            if piece not in seen and len(tokens) + len(pieces) < VOCAB_SIZE:
                pieces.append(piece)
                seen.add(piece)
    for word in words:
        for piece in ("\u2581" + word, word):
            if piece not in seen and len(tokens) + len(pieces) < VOCAB_SIZE:
                pieces.append(piece)
                seen.add(piece)
    if len(tokens) + len(pieces) != VOCAB_SIZE:
        raise AssertionError(f"vocabulary has {len(tokens) + len(pieces)} tokens, want {VOCAB_SIZE}")
    tokens += pieces
    types += [TOKEN_NORMAL] * len(pieces)
    # SentencePiece scores: longer pieces first, so words tokenize as words, not letters.
    scores = [0.0] * (N_SPECIAL + N_BYTES) + [float(len(p)) - i * 1e-3 for i, p in enumerate(pieces)]
    return tokens, scores, types


def _weights(preset: Preset, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    h = preset.hidden
    out: list[tuple[str, np.ndarray]] = []
    for name, shape in preset.tensor_shapes():
        if name.endswith("norm.weight"):
            array = np.ones(shape, dtype=np.float32)
        else:
            fan_in = shape[-1] if len(shape) == 2 else h
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
        if name == "token_embd.weight":
            array[:, 0] = ANCHOR  # dimension 0: the same large constant for every token
        elif name.endswith(("attn_output.weight", "ffn_down.weight")):
            array[0, :] = 0.0  # no layer writes to dimension 0, so it survives to the output
        elif name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight")):
            array[:, 0] = 0.0  # and no layer reads it: activations stay those of a random model
        elif name == "output.weight":
            array[:, 0] = 0.0
            array[: N_SPECIAL + N_BYTES, 0] = BANNED_LOGIT_WEIGHT  # never sampled: see the module docstring
        out.append((name, array))
    return out


def write_model(path: Path, preset: Preset | str, *, seed: int = 0) -> Path:
    """Write one GGUF file atomically (a temporary file renamed into place); returns `path`."""
    import gguf  # a dev dependency: imported here so `--help` works without it

    if isinstance(preset, str):
        preset = PRESETS[preset]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never share one
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"ibc-test-{preset.name}")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(preset.hidden)
    writer.add_block_count(preset.layers)
    writer.add_feed_forward_length(preset.feed_forward)
    writer.add_head_count(preset.hidden // HEAD_DIM)
    writer.add_head_count_kv(preset.hidden // HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in _weights(preset, seed):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write deterministic LLaMA-architecture GGUF test models.")
    parser.add_argument("dir", type=Path, help="where to write <preset>.gguf")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: all presets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.preset or list(PRESETS):
        started = time.monotonic()
        path = write_model(args.dir / f"{name}.gguf", name, seed=args.seed)
        took = time.monotonic() - started
        print(f"{path}: {path.stat().st_size / 1e6:.0f} MB in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
