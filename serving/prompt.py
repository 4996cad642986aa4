"""A prompt's leading blocks, keyed: the one definition shared by the proxy's prefix-affinity routing and
the mock backend's simulated prefix cache (stdlib only, so the mock stays light).

vLLM's automatic prefix caching keys each full block of 16 tokens by a hash of every token up to the
block's end, so a block is a hit only when the whole prompt up to there matches one seen before. We have
no tokenizer here: a block is `BLOCK_BYTES` bytes of the prompt's UTF-8 text (about 16 tokens of
English), and the key of the first n blocks is a BLAKE2b digest of those n blocks, computed as one
running hash (a copy at each block's end). The hash is stable (not Python's per-process `hash`), so
every proxy worker and every proxy replica computes the same keys for the same prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

# Bytes per block: ~16 tokens of English text, vLLM's default KV block size.
BLOCK_BYTES = 64
# Bytes a simulated token stands for (token counts such as vLLM's prefix-cache counters): a block is 16.
BYTES_PER_TOKEN = 4


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a model would prefill for an OpenAI request body: chat messages (role and text content,
    in order) or a completion's prompt; "" for anything else (embeddings, malformed fields)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            parts.append(f"<{role if isinstance(role, str) else ''}>")
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # content parts: only their text is a prefix we can hash
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:  # a batch (the first prompt routes) or token ids
        prompt = prompt[0] if isinstance(prompt[0], str) else " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def prefix_keys(text: str, blocks: Sequence[int]) -> list[bytes]:
    """The key of the prompt's first n full blocks for each n of `blocks` (ascending, >= 1), as far as the
    text has that many; a partial last block has no key."""
    if not blocks:
        return []
    if blocks[0] < 1:
        raise ValueError(f"a prefix has at least 1 block, got {blocks[0]}")
    # Encode only what the longest prefix needs (a character is at least one byte).
    raw = text[: blocks[-1] * BLOCK_BYTES].encode("utf-8", "surrogatepass")
    out: list[bytes] = []
    digest = hashlib.blake2b(digest_size=8)
    done = 0
    for n in blocks:
        end = n * BLOCK_BYTES
        if end > len(raw):
            break
        digest.update(raw[done:end])
        done = end
        out.append(digest.copy().digest())
    return out


def prompt_bytes(text: str) -> int:
    """The size of the prompt's UTF-8 text, the unit of blocks and simulated tokens."""
    return len(text.encode("utf-8", "surrogatepass"))


def block_count(size_bytes: int) -> int:
    """Blocks a prompt of this size fills, the last one possibly partial."""
    return -(-size_bytes // BLOCK_BYTES)


def token_count(size_bytes: int) -> int:
    """The simulated token count of a prompt of this size (ceil of bytes / BYTES_PER_TOKEN)."""
    return -(-size_bytes // BYTES_PER_TOKEN)
