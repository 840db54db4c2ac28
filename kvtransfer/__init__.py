"""Moving finished KV blocks between workers with NIXL, under leases.

The prefill side registers its cache with a ``KVTransferAgent`` and pins a finished
request's blocks in a ``LeaseTable``; the decode side adds it as a peer (metadata and
``KVLayout`` from the gRPC handshake) and reads the blocks into its own, with a deadline.
"""
from splitserve.kvtransfer.agent import KVTransferAgent, Notification
from splitserve.kvtransfer.descriptors import Run, Span, coalesce, runs_to_spans
from splitserve.kvtransfer.errors import (
    BadMetadataError,
    IncompatiblePeerError,
    InvalidBlocksError,
    KVTransferError,
    PeerDisconnectedError,
    TransferFailedError,
    TransferTimeoutError,
    UnknownPeerError,
)
from splitserve.kvtransfer.layout import BLOCK_MAJOR, KVLayout, block_bytes
from splitserve.kvtransfer.lease import Lease, LeaseTable
from splitserve.kvtransfer.transfer import TransferResult

__all__ = [
    "BLOCK_MAJOR",
    "BadMetadataError",
    "IncompatiblePeerError",
    "InvalidBlocksError",
    "KVLayout",
    "KVTransferAgent",
    "KVTransferError",
    "Lease",
    "LeaseTable",
    "Notification",
    "PeerDisconnectedError",
    "Run",
    "Span",
    "TransferFailedError",
    "TransferResult",
    "TransferTimeoutError",
    "UnknownPeerError",
    "block_bytes",
    "coalesce",
    "runs_to_spans",
]
