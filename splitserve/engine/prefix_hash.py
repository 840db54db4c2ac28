"""Block hashes for prefix caching, shared by the engine and the router.

A block's hash chains its parent's hash, its token ids and any extra keys
(for example a LoRA or multimodal id) through SHA-256 of a fixed byte
encoding, so every process on every machine computes the same value. Python's
``hash()`` is never used: it is salted per process. Only full blocks are hashed.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes: the first half of a SHA-256 digest

ROOT_HASH: BlockHash = b"\x00" * 16


def hash_block_tokens(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[str] = (),
) -> BlockHash:
    h = hashlib.sha256()
    h.update(parent_hash or ROOT_HASH)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra_keys:
        raw = key.encode()
        h.update(struct.pack("<I", len(raw)))
        h.update(raw)
    return h.digest()[:16]


def hash_request_tokens(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str] = (),
    parent_hash: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``, each chained to the one before."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent_hash)
    return hashes
