"""The decode worker: pulls a prompt's KV from a prefill worker (or prefills it here) and streams tokens."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from splitserve.engine.scheduler import KVLoad, RemoteKV
from splitserve.kvtransfer import KVTransferError, PeerDisconnectedError, TransferTimeoutError
from splitserve.kvtransfer.breaker import PeerBreaker
from splitserve.kvtransfer.paths import SLOW_VRAM_GBPS, slow_path_cause
from splitserve.parallel import RankFailedError
from splitserve.services.convert import token_logprob_from_proto
from splitserve.services.decode.session import RouterSession
from splitserve.services.peers import ListedPeers
from splitserve.services.security import ChannelSecurity, dial
from splitserve.services.sleep_rpc import SleepRPCs
from splitserve.services.worker import WorkerRuntime, peer_from_proto
from splitserve.services.worker_calls import RequestFailed, compile_constraint, parse, submit
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)


class DecodeService(SleepRPCs, worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, runtime: WorkerRuntime, security: ChannelSecurity | None = None) -> None:
        self.runtime = runtime
        self.security = security  # TLS to the prefill workers, as the router dials them
        self.transfer = runtime.config.transfer
        runtime.loop.on_kv_load = self._load_kv
        self._handles: dict[str, worker_pb.KVHandle] = {}  # request id -> where its KV is
        self._handshakes: dict[str, asyncio.Future] = {}  # agent name -> peer added
        self._channels: dict[str, grpc.aio.Channel] = {}
        t = self.transfer
        # A probe's outcome arrives within its transfer's deadline; past twice that it was lost.
        self.breaker = PeerBreaker(t.peer_backoff_seconds, t.max_peer_backoff_seconds, 2 * t.transfer_timeout_seconds + 5.0)
        self.peers = ListedPeers(runtime.control_plane)  # the only prefill workers this one dials
        self.num_kv_transfers = 0
        self.num_kv_bytes = 0
        self.num_local_prefills = 0
        self.num_transfer_failures = 0
        self.draining = False
        self._sessions: set[RouterSession] = set()
        runtime.on_wake.append(self._forget_peers)

    async def start(self) -> None:
        self.runtime.spawn(self._reclaim())

    async def Decode(self, commands, context):
        session = RouterSession(self)
        self._sessions.add(session)
        try:
            async for message in session.run(commands):
                yield message
        finally:
            self._sessions.discard(session)

    async def start_request(self, request: worker_pb.DecodeRequest, sink, still_wanted) -> None:
        """Checks a request, sets up its KV source and submits it; raises RequestFailed.

        ``still_wanted()`` says whether the router still wants it after the handshake wait.
        """
        request_id, prompt, params = parse(request.request)
        await compile_constraint(self.runtime, params)  # off the event loop; the submit below finds it compiled
        kv = request.kv if request.HasField("kv") else None
        if kv is not None and not await self.peers.listed(kv.worker_id, kv.address):
            # Not a prefill worker of the registry at that address: neither read from nor released there.
            log.warning("refusing KV of %s: %s at %s is not a listed prefill worker; prefilling locally", request_id, kv.worker_id, kv.address)
            self.runtime.metrics.error("kv_peer_unlisted")
            kv = None
        if kv is not None and not self.breaker.allow(kv.agent_name):
            # Backed off after a failed transfer: no request waits out its timeouts until a probe succeeds.
            self.runtime.metrics.error("kv_peer_backed_off")
            asyncio.ensure_future(self._release_remote(kv, request_id))
            kv = None
        if kv is not None:
            try:
                await self._ensure_peer(kv)
            except (KVTransferError, grpc.aio.AioRpcError) as e:
                # An incompatible, unreachable or too slow peer: refuse its KV, compute the prompt here instead.
                log.warning("refusing KV of %s from %s, prefilling locally: %s", request_id, kv.worker_id, _describe(e))
                self.runtime.metrics.error("kv_peer_refused")
                self._back_off(kv, e)
                asyncio.ensure_future(self._release_remote(kv, request_id))
                kv = None
            if not still_wanted():
                if kv is not None:
                    asyncio.ensure_future(self._release_remote(kv, request_id))
                return
        # The first token was sampled by the prefill worker (and already streamed): decode continues after it.
        first = token_logprob_from_proto(request.first_token, True) if request.HasField("first_token") else None
        remote = None
        if kv is not None:
            self._handles[request_id] = kv
            remote = RemoteKV(list(kv.block_ids), kv.num_tokens)
        else:
            self.num_local_prefills += 1
        loop = self.runtime.loop
        try:
            submit(self.runtime, lambda: loop.submit(request_id, prompt, params, remote_kv=remote, first_token=first, sink=sink))
        except RequestFailed as e:
            # Nothing was read: the KV stays pinned where it is, for another decode worker to take.
            e.refused = remote is not None or not request.HasField("kv")
            self._handles.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        """The request ends before finishing (cancelled, failed, its router gone): free its blocks here and there."""
        self.runtime.loop.abort(request_id)
        self.forget(request_id)

    def forget(self, request_id: str) -> None:
        """The request is done here; a prefill worker still holding its KV (never read: all of it was cached here) lets go."""
        kv = self._handles.pop(request_id, None)
        if kv is not None:
            asyncio.ensure_future(self._release_remote(kv, request_id))

    async def drain(self, timeout: float) -> None:
        """On shutdown: each router is told, new requests are refused, and each router closes its
        stream once its requests are done; returns when all have ended, or after ``timeout`` seconds."""
        self.draining = True
        for session in self._sessions:
            session.wake.set()
        deadline = time.monotonic() + timeout
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _ensure_peer(self, kv: worker_pb.KVHandle) -> None:
        """Adds the prefill worker's agents once per incarnation (its agent name changes on restart)."""
        if kv.agent_name in self.runtime.kv.peers:
            return
        pending = self._handshakes.get(kv.agent_name)
        if pending is None:
            pending = self._handshakes[kv.agent_name] = asyncio.ensure_future(self._handshake(kv))
        try:
            await asyncio.shield(pending)
        except BaseException:
            self._handshakes.pop(kv.agent_name, None)
            raise

    async def _handshake(self, kv: worker_pb.KVHandle) -> None:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel(kv.address))
        meta = await stub.GetTransferMetadata(worker_pb.TransferMetadataRequest(), timeout=self.transfer.transfer_timeout_seconds)
        kv_group = self.runtime.kv
        # Earlier incarnations of the same worker are gone: forget them.
        for old in [p for p in kv_group.peers if kv_group.peer(p).worker_id == meta.worker_id and p != meta.agent_name]:
            await self._drop_peer(old)
        # Every local rank adds the prefill ranks holding its KV heads; the TP sizes may differ.
        await kv_group.add_peer(peer_from_proto(meta), timeout=self.transfer.transfer_timeout_seconds)
        try:
            await self._check_path(kv, meta.agent_name)
        except BaseException:
            await self._drop_peer(meta.agent_name)
            raise

    async def _check_path(self, kv: worker_pb.KVHandle, agent_name: str) -> None:
        """Times a small read from the new peer; a path far below the hardware is a warning, and
        below ``min_peer_gbps`` the peer is refused (its requests are prefilled here)."""
        result, path, same_host = await self.runtime.kv.probe(agent_name, self.transfer.transfer_timeout_seconds)
        gbps = result.num_bytes / max(result.seconds, 1e-9) / 1e9
        self.runtime.metrics.kv_peer_gbps.labels("decode", kv.worker_id, path).set(gbps)
        ours, theirs = self.runtime.agent.region, self.runtime.agent.peer_region(agent_name)
        cause = slow_path_cause(path, ours, theirs, same_host) if gbps < SLOW_VRAM_GBPS else None
        log.info("KV peer %s (%s) reads over %s: %.2f GB/s (%d bytes in %.2f ms)", kv.worker_id, agent_name, path, gbps,
                 result.num_bytes, 1e3 * result.seconds)
        if cause is not None:
            log.warning("KV reads from %s move %.2f GB/s over %s, far below what GPUs move: %s", kv.worker_id, gbps, path, cause)
            self.runtime.metrics.error("kv_path_slow")
        if gbps < self.transfer.min_peer_gbps:
            raise KVTransferError(
                f"peer {kv.worker_id} reads at {gbps:.2f} GB/s over {path}, below --min-kv-gbps {self.transfer.min_peer_gbps:g}"
                + (f" ({cause})" if cause else "")
            )

    def _back_off(self, kv: worker_pb.KVHandle, error: Exception) -> None:
        seconds = self.breaker.failed(kv.agent_name)
        if seconds is not None:
            log.warning("backing off KV peer %s for %.1fs (its requests are prefilled here, then one probes it): %s",
                        kv.worker_id, seconds, _describe(error))

    async def _drop_peer(self, agent_name: str) -> None:
        """Forgets a peer and its finished handshake, so that its next request handshakes afresh
        (a cached handshake would skip that, and every read would then find no such peer)."""
        self._handshakes.pop(agent_name, None)
        await self.runtime.kv.remove_peer(agent_name)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = dial(address, self.security)
        return self._channels[address]

    async def _load_kv(self, load: KVLoad) -> None:
        """Runs on the event loop for each KVLoad the engine emits; always reports back to the engine."""
        kv = self._handles.pop(load.request_id, None)
        if kv is None:
            self.runtime.loop.finish_kv_load(load.request_id, False)
            return
        if self.breaker.is_open(kv.agent_name):  # it failed since this request was admitted
            self._transfer_failed(load, kv, KVTransferError(f"peer {kv.worker_id} is backed off"))
            return
        kv_group, start = self.runtime.kv, time.perf_counter()
        renewer = asyncio.ensure_future(self._renew_lease(kv, load.request_id))
        try:
            # Each local rank reads its own KV heads (from the prefill ranks holding them), all under one deadline.
            result = await kv_group.read(
                kv.agent_name,
                load.remote_block_ids,
                load.local_block_ids,
                notify=load.request_id.encode(),
                timeout=self.transfer.transfer_timeout_seconds,
            )
        except TransferTimeoutError as e:
            self._transfer_failed(load, kv, e, quarantine=frozenset(load.local_block_ids))
            return
        except (KVTransferError, RankFailedError) as e:
            if isinstance(e, PeerDisconnectedError) and kv.agent_name in kv_group.peers:
                await self._drop_peer(kv.agent_name)
            self._transfer_failed(load, kv, e)
            return
        except Exception as e:  # a bug: still report back, or the request would wait forever
            log.exception("KV load of %s failed", load.request_id)
            self._transfer_failed(load, kv, e)
            return
        finally:
            renewer.cancel()
        self.breaker.succeeded(kv.agent_name)
        if not result.notified:  # several READs, or CUDA IPC: no READ's end tells the prefill worker it may let go
            asyncio.ensure_future(self._release_remote(kv, load.request_id))
        self.num_kv_transfers += 1
        self.num_kv_bytes += result.num_bytes
        self.runtime.metrics.kv_bytes.labels("decode").inc(result.num_bytes)
        self.runtime.metrics.kv_seconds.labels("decode").observe(time.perf_counter() - start)
        self.runtime.loop.finish_kv_load(load.request_id, True)

    def _transfer_failed(self, load: KVLoad, kv, error: Exception, quarantine: frozenset[int] = frozenset()) -> None:
        """The request is prefilled here instead; the prefill side is told to let go."""
        log.warning("KV transfer for %s from %s failed (%s); prefilling locally", load.request_id, kv.worker_id, error)
        self._back_off(kv, error)
        self.num_transfer_failures += 1
        self.runtime.metrics.error("kv_transfer_failed")
        self.num_local_prefills += 1
        self.runtime.loop.finish_kv_load(load.request_id, False, quarantine)
        asyncio.ensure_future(self._release_remote(kv, load.request_id))

    async def _renew_lease(self, kv: worker_pb.KVHandle, request_id: str) -> None:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel(kv.address))
        while True:
            await asyncio.sleep(max(kv.lease_seconds / 3, 0.05))
            try:
                await stub.RenewLease(worker_pb.LeaseRequest(request_id=request_id), timeout=1.0)
            except grpc.aio.AioRpcError:
                pass  # the transfer's own deadline decides

    async def _release_remote(self, kv: worker_pb.KVHandle, request_id: str) -> None:
        try:
            stub = worker_pb2_grpc.PrefillWorkerStub(self._channel(kv.address))
            await stub.ReleaseKV(worker_pb.LeaseRequest(request_id=request_id), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            log.info("release of %s on %s failed: %s (its lease will expire)", request_id, kv.worker_id, e.code().name)

    async def _forget_peers(self) -> None:
        """Woken with a new agent: it knows no peer, so every prefill worker is handshaken afresh."""
        self._handshakes.clear()

    async def _reclaim(self) -> None:
        """Blocks of timed-out READs come back once NIXL reports them settled."""
        while True:
            if self.runtime.sleep_mode.sleeping:  # its agent is closed (the engine freed those blocks)
                await asyncio.sleep(0.5)
                continue
            blocks = self.runtime.kv.reclaim()
            if blocks:
                self.runtime.loop.free_quarantined(blocks)
            await asyncio.sleep(0.5)

    async def GetTransferMetadata(self, request, context) -> worker_pb.TransferMetadata:
        return self.runtime.transfer_metadata()

    async def GetStats(self, request, context) -> worker_pb.WorkerStats:
        return self.runtime.stats(
            {"num_local_prefills": self.num_local_prefills, "num_kv_transfers": self.num_kv_transfers, "num_kv_bytes_transferred": self.num_kv_bytes}
        )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)
