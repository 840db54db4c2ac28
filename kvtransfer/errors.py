"""The transfer layer's exceptions, and the one place NIXL's exceptions are translated.

NIXL raises one unrelated exception class per status code (``nixlRemoteDisconnectError``,
``nixlNotFoundError``, ...) and returns None for descriptor input it cannot parse. Callers of
``splitserve.kvtransfer`` only ever see the classes below.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class KVTransferError(Exception):
    """Base class: a KV transfer or a peer operation failed."""


class IncompatiblePeerError(KVTransferError):
    """The peer's KV layout differs from ours; ``mismatches`` maps field -> (ours, theirs)."""

    def __init__(self, peer: str, mismatches: dict[str, tuple[object, object]]) -> None:
        self.peer = peer
        self.mismatches = mismatches
        fields = ", ".join(f"{k} (ours {a!r}, theirs {b!r})" for k, (a, b) in mismatches.items())
        super().__init__(f"peer {peer!r} has an incompatible KV layout: {fields}")


class UnknownPeerError(KVTransferError):
    """No peer of that name was added (or it was removed)."""


class BadMetadataError(KVTransferError):
    """Peer metadata could not be decoded or does not name the expected agent."""


class InvalidBlocksError(KVTransferError, ValueError):
    """Block ids out of range, duplicated, or the two lists differ in length."""


class PeerDisconnectedError(KVTransferError):
    """The peer's process went away (killed, crashed, restarted); re-add it with fresh metadata."""


class TransferFailedError(KVTransferError):
    """NIXL reported an error for a transfer that is not a disconnect."""


class TransferTimeoutError(KVTransferError):
    """A transfer did not finish by its deadline; NIXL never times out a hung peer itself.

    For a READ the local destination blocks are *in doubt*: the stalled peer may still
    complete the copy later, so the agent keeps them until ``KVTransferAgent.reclaim()``
    hands them back. ``blocks_in_doubt`` lists them (empty for a WRITE, whose local
    blocks are only a source).
    """

    def __init__(self, peer: str, timeout: float, blocks_in_doubt: tuple[int, ...]) -> None:
        self.peer = peer
        self.timeout = timeout
        self.blocks_in_doubt = blocks_in_doubt
        super().__init__(
            f"transfer with peer {peer!r} did not finish within {timeout:.3f}s "
            f"({len(blocks_in_doubt)} local blocks held until reclaimed)"
        )


def _is_nixl_error(exc: BaseException) -> bool:
    # The bindings' exception classes share no base class but all live in one module.
    return type(exc).__module__.endswith("._bindings") and type(exc).__name__.startswith("nixl")


@contextmanager
def translate_nixl_errors(what: str, peer: str) -> Iterator[None]:
    """Re-raise NIXL's exceptions from the block as this module's, naming ``what`` and ``peer``."""
    try:
        yield
    except Exception as exc:
        if not _is_nixl_error(exc):
            raise
        name = type(exc).__name__
        if name == "nixlRemoteDisconnectError":
            raise PeerDisconnectedError(
                f"{what}: peer {peer!r} disconnected; re-add it with fresh metadata"
            ) from exc
        if name == "nixlNotFoundError":
            raise TransferFailedError(
                f"{what}: NIXL does not know peer {peer!r} or its memory (removed or re-added?)"
            ) from exc
        raise TransferFailedError(f"{what} (peer {peer!r}) failed: {name} {exc}") from exc
