"""The router's view of the workers: who is live (from the control plane) and a channel to each."""
from __future__ import annotations

import logging
import time

import grpc

from splitserve.controlplane import ControlPlane, LiveWorker
from splitserve.controlplane.interface import DEFAULT_REGISTRATION_TTL_SECONDS
from splitserve.services.router.decode_streams import DecodeStream
from splitserve.controlplane.types import ControlPlaneUnavailable
from splitserve.services.router.host_matches import TierMatches, match_tiers
from splitserve.services.router.index import RouterIndex
from splitserve.services.security import ChannelSecurity, dial
from splitserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)


# One Decode stream carries all of this router's requests on a worker, one message per engine
# step or more. With HTTP/2's default windows (64 KiB, grown further by BDP probing) many such
# messages queue per stream when the router reads slower than the worker writes, and the worker
# never notices. A 16 KiB window stops it after a few steps, so its stream backs up and it
# merges the waiting steps into one message (services/decode/session.py), which is what lets
# a busy router catch up.
DECODE_CHANNEL_OPTIONS = (("grpc.http2.lookahead_bytes", 16 << 10), ("grpc.http2.bdp_probe", 0))


class WorkerDirectory:
    """Live workers by role, and cached gRPC stubs by address.

    A worker whose call failed is set aside for ``cooldown_seconds`` so that
    retries go elsewhere even before its registration lapses. ``security``: TLS (mutual
    when the router has a client certificate) to the workers; None dials them in plaintext.
    """

    def __init__(
        self, control_plane: ControlPlane, block_size: int, cooldown_seconds: float = 5.0, security: ChannelSecurity | None = None,
        registration_ttl_seconds: float = DEFAULT_REGISTRATION_TTL_SECONDS,
    ) -> None:
        """``block_size``: what this router hashes prompts with; workers of another block size are not used.
        ``registration_ttl_seconds``: the workers' (WorkerConfig.heartbeat_ttl_seconds), how long the
        last known workers stay routable after the store comes back empty."""
        self.control_plane = control_plane
        self.block_size = block_size
        self._mismatched: set[str] = set()
        # Worker list and block index, with this router's in-flight requests and a load-only fallback.
        self.index = RouterIndex(control_plane)
        self.cooldown_seconds = cooldown_seconds
        self.security = security
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._failed_at: dict[str, float] = {}
        self._decode_streams: dict[str, DecodeStream] = {}
        self.continuity = RegistryContinuity(control_plane, registration_ttl_seconds)

    async def live(self, role: str) -> list[LiveWorker]:
        now = time.monotonic()
        listed = self.continuity.workers(role, await self.index.candidates(role))
        # A sleeping worker stays registered (so it can be woken) but takes nothing.
        workers = [w for w in listed if self._same_block_size(w) and not w.load.sleeping]
        return [w for w in workers if now - self._failed_at.get(w.info.worker_id, -1e9) > self.cooldown_seconds]

    def _same_block_size(self, worker: LiveWorker) -> bool:
        if worker.info.block_size == self.block_size:
            return True
        if worker.info.worker_id not in self._mismatched:  # say it once per worker
            self._mismatched.add(worker.info.worker_id)
            log.warning(
                "not routing to %s: its block_size %d differs from the router's %d (prefix hashes would not match)",
                worker.info.worker_id, worker.info.block_size, self.block_size,
            )
        return False

    async def match_prefix(self, block_hashes: list[bytes], workers: list[LiveWorker]) -> dict[str, int] | None:
        """Prefix matches, or None when the index is unreachable (the policy then routes by load)."""
        return await self.index.match_prefix(block_hashes, [w.info.worker_id for w in workers])

    async def match_prefix_tiers(self, block_hashes: list[bytes], workers: list[LiveWorker]) -> TierMatches | None:
        """Leading blocks each worker holds in either KV tier, and how many of them are on its
        host tier; None when the index is unreachable."""
        gpu = await self.match_prefix(block_hashes, workers)
        host_workers = {w.info.worker_id for w in workers if w.info.host_kv_blocks}
        if gpu is None or not host_workers:
            return None if gpu is None else TierMatches(gpu, dict.fromkeys(gpu, 0))
        try:
            return await match_tiers(self.index.match_store, block_hashes, gpu, host_workers)
        except ControlPlaneUnavailable:
            return TierMatches(gpu, dict.fromkeys(gpu, 0))

    def mark_failed(self, worker_id: str) -> None:
        self._failed_at[worker_id] = time.monotonic()

    def channel(self, address: str, options: tuple[tuple[str, int], ...] = ()) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.enable_retries", 0), *options]
            channel = self._channels[address] = dial(address, self.security, options)
        return channel

    def prefill_stub(self, address: str) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self.channel(address))

    def decode_stream(self, address: str) -> DecodeStream:
        """This router's Decode stream to the worker at ``address``; a new one when the last has ended."""
        stream = self._decode_streams.get(address)
        if stream is None or stream.closed:
            stub = worker_pb2_grpc.DecodeWorkerStub(self.channel(address, DECODE_CHANNEL_OPTIONS))
            stream = self._decode_streams[address] = DecodeStream(stub, address)
        return stream

    async def close(self) -> None:
        for stream in self._decode_streams.values():
            await stream.close()
        self._decode_streams.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class RegistryContinuity:
    """Keeps the last known workers routable for one registration TTL after the store comes back empty.

    A Redis restarted without its data lists no worker until each one's next heartbeat finds
    itself unregistered and registers again (within a TTL); without this, every request in
    between would be refused with "no decode worker is available" while all of them are up.
    A worker kept this way that is really gone fails its call and is set aside like any other.
    """

    def __init__(self, control_plane: ControlPlane, grace_seconds: float, clock=time.monotonic) -> None:
        self._control_plane = control_plane
        self._grace_seconds = grace_seconds
        self._clock = clock
        self._num_resets = control_plane.num_resets
        self._last: dict[str, list[LiveWorker]] = {}  # role -> as the store last listed them before a reset
        self._kept: dict[str, list[LiveWorker]] = {}
        self._kept_until = 0.0

    def workers(self, role: str, listed: list[LiveWorker]) -> list[LiveWorker]:
        now = self._clock()
        if self._control_plane.num_resets != self._num_resets:
            self._num_resets = self._control_plane.num_resets
            self._kept, self._kept_until = dict(self._last), now + self._grace_seconds
            log.warning("the control plane's store came back empty: keeping %d known workers for %.1fs while they re-register",
                        sum(len(w) for w in self._kept.values()), self._grace_seconds)
        if now >= self._kept_until:
            self._last[role] = listed
            return listed
        ids = {w.info.worker_id for w in listed}
        return listed + [w for w in self._kept.get(role, ()) if w.info.worker_id not in ids]
