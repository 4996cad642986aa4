"""A prompt's leading blocks, hashed: the one definition shared by the proxy's prefix-affinity routing and
the mock backend's simulated prefix cache (stdlib only, so the mock stays light).

vLLM's automatic prefix caching keys each full block of 16 tokens by a hash chained over every block
before it, so a block is a hit only when the whole prompt up to its end matches one seen before. We have
no tokenizer here: a block is `BLOCK_CHARS` characters of the prompt's text (about 16 tokens of English),
chained the same way. The hash is a stable BLAKE2b digest (not Python's per-process `hash`), so every
proxy worker and every proxy replica computes the same keys for the same prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

# Characters per block: ~16 tokens of English text, vLLM's default KV block size.
BLOCK_CHARS = 64
# Characters a simulated token stands for (for token counts such as vLLM's prefix-cache counters).
CHARS_PER_TOKEN = 4


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
                parts.extend(
                    p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:  # a batch (the first prompt routes) or token ids
        prompt = prompt[0] if isinstance(prompt[0], str) else " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def block_hashes(text: str, *, block_chars: int = BLOCK_CHARS, max_blocks: int | None = None) -> list[bytes]:
    """One chained digest per full block of `text` (at most `max_blocks`); a partial last block has none."""
    if block_chars < 1:
        raise ValueError(f"block_chars must be >= 1, got {block_chars}")
    count = len(text) // block_chars
    if max_blocks is not None:
        count = min(count, max_blocks)
    out: list[bytes] = []
    previous = b""
    for i in range(count):
        block = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=8).digest()
        out.append(previous)
    return out


def tokens_of(text: str) -> int:
    """The simulated token count of `text` (ceil of characters / CHARS_PER_TOKEN)."""
    return -(-len(text) // CHARS_PER_TOKEN)
