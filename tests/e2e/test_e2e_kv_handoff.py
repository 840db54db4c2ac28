"""The KV hand-off between real prefill and decode processes over NIXL, and its failure paths:
peers that stall, die, restart or are too slow (refused at the handshake, backed off after a timeout).

Every test ends by checking that no KV block is leaked on either side.
"""
from __future__ import annotations

import asyncio
import signal
import time

import grpc

from splitserve.client import Client, build_request
from splitserve.testing.cluster import wait_until
from splitserve.v1 import generation_pb2_grpc
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc


def _all_free(*services) -> bool:
    for service in services:
        s = service.stats()
        if s.num_free_blocks != s.num_total_blocks or s.num_pinned_blocks or s.num_running or s.num_waiting:
            return False
    return True


def test_decode_prefix_hits_are_not_transferred_again(start_cluster, greedy):
    cluster = start_cluster()
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    client = Client(cluster.address)
    prompt = list(range(3, 3 + 100))  # 6 full blocks and a partial one
    first = client.complete(prompt, max_tokens=5, ignore_eos=True, timeout=60)
    bytes_first = decode.stats().num_kv_bytes_transferred
    second = client.complete(prompt + [9], max_tokens=5, ignore_eos=True, timeout=60)
    bytes_second = decode.stats().num_kv_bytes_transferred - bytes_first
    assert first.token_ids == greedy(prompt, 5)
    assert second.token_ids == greedy(prompt + [9], 5)
    # The decode worker already held the 6 full blocks: only the last, partial block moved.
    assert 0 < bytes_second <= bytes_first / 6
    assert wait_until(lambda: _all_free(prefill, decode))


def test_prefill_stopped_before_the_read_times_out_and_decode_recomputes(start_cluster, greedy):
    cluster = start_cluster(worker_args=["--transfer-timeout", "2", "--lease-seconds", "60"])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    client = Client(cluster.address)
    client.complete(list(range(500, 540)), max_tokens=2, ignore_eos=True, timeout=60)  # peers have met
    decode.signal(signal.SIGSTOP)
    prompt = list(range(3, 70))
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    call = stub.Generate(build_request(prompt, max_tokens=8, ignore_eos=True), timeout=90)
    first = next(call)  # prefill is done and its blocks are pinned for decode
    prefill.signal(signal.SIGSTOP)  # the READ will hang: NIXL never times out on its own
    decode.signal(signal.SIGCONT)
    rest = list(call)
    tokens = list(first.delta.token_ids) + [t for r in rest for t in r.delta.token_ids]
    assert tokens == greedy(prompt, 8)  # the transfer's deadline fired and decode prefilled itself
    assert decode.stats().num_local_prefills >= 1
    prefill.signal(signal.SIGCONT)
    # The timed-out READ's blocks were quarantined, then reclaimed; the prefill side let go.
    assert wait_until(lambda: _all_free(prefill, decode), timeout=30)


def test_prefill_killed_before_the_read_fails_over_to_local_prefill(start_cluster, greedy):
    cluster = start_cluster(worker_args=["--transfer-timeout", "2"])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    decode.signal(signal.SIGSTOP)
    prompt = list(range(3, 70))
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    call = stub.Generate(build_request(prompt, max_tokens=8, ignore_eos=True), timeout=90)
    first = next(call)
    prefill.kill()
    decode.signal(signal.SIGCONT)
    tokens = list(first.delta.token_ids) + [t for r in call for t in r.delta.token_ids]
    assert tokens == greedy(prompt, 8)
    assert wait_until(lambda: _all_free(decode), timeout=30)


def test_restarted_prefill_worker_is_a_fresh_peer(start_cluster, greedy):
    cluster = start_cluster()
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    client = Client(cluster.address)
    assert client.complete(list(range(3, 40)), max_tokens=3, ignore_eos=True, timeout=60).completion_tokens == 3
    transfers_before = decode.stats().num_kv_transfers
    prefill.kill()
    cluster.workers.remove(prefill)
    (restarted,) = cluster.add_workers(("prefill", "prefill-0"))  # same worker id, new process and agent
    prompt = list(range(200, 260))
    assert client.complete(prompt, max_tokens=4, ignore_eos=True, timeout=60).token_ids == greedy(prompt, 4)
    assert decode.stats().num_kv_transfers == transfers_before + 1  # moved over NIXL, not recomputed
    assert wait_until(lambda: _all_free(restarted, decode))


def test_incompatible_prefill_peer_is_refused(start_cluster, greedy):
    cluster = start_cluster()
    prefill, decode = cluster.add_workers(("prefill", "prefill-bf16", ["--dtype", "bfloat16"]), ("decode", "decode-0"))
    prompt = list(range(3, 50))
    result = Client(cluster.address).complete(prompt, max_tokens=4, ignore_eos=True, timeout=60)
    # The first token came from the bf16 prefill worker; its KV was refused, so decode recomputed
    # the prompt in fp32 and continued after that token.
    assert len(result.token_ids) == 4 and prefill.stats().num_requests_finished == 1
    assert decode.stats().num_kv_transfers == 0 and decode.stats().num_local_prefills == 1
    assert "dtype" in decode.output()
    assert wait_until(lambda: _all_free(prefill, decode))


def test_router_does_not_route_to_a_worker_of_another_block_size(start_cluster, greedy):
    cluster = start_cluster()
    prefill, decode = cluster.add_workers(("prefill", "prefill-bs8", ["--block-size", "8"]), ("decode", "decode-0"))
    prompt = list(range(3, 50))
    result = Client(cluster.address).complete(prompt, max_tokens=4, ignore_eos=True, timeout=60)
    assert result.token_ids == greedy(prompt, 4)  # the decode worker prefilled it itself
    assert prefill.stats().num_requests_finished == 0 and decode.stats().num_local_prefills == 1
    assert "block_size 8" in cluster.router.output()


def _prefill_then_decode(prefill, decode, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    """One request the way the router runs it: Prefill on ``prefill``, then a Decode stream with its KV handle."""
    engine_request = worker_pb.EngineRequest(request_id=request_id, prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
    with grpc.insecure_channel(prefill.address) as channel:
        response = worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(worker_pb.PrefillRequest(request=engine_request), timeout=60)
    start = worker_pb.DecodeRequest(request=engine_request, first_token=response.first_token, kv=response.kv)
    tokens = [response.first_token.token_id]
    with grpc.insecure_channel(decode.address) as channel:
        for message in worker_pb2_grpc.DecodeWorkerStub(channel).Decode(iter([worker_pb.DecodeCommand(start=start)]), timeout=60):
            for update in message.updates:
                assert not update.error_code, update.error_message
                tokens += [t.token_id for t in update.tokens]
    return tokens


def _listed_prefill_address(cluster, worker_id: str) -> str | None:
    from splitserve.controlplane import connect

    async def read():
        control_plane = await connect(cluster.control_plane)
        try:
            return {w.info.worker_id: w.info.address for w in await control_plane.live_workers("prefill")}.get(worker_id)
        finally:
            await control_plane.close()

    return asyncio.run(read())


def test_a_peer_dropped_for_another_incarnation_is_added_again_on_its_next_request(start_cluster, greedy):
    # Two live prefill processes under one worker id (an old incarnation still running while its
    # replacement starts): meeting the second drops the first. Once the second has stopped and
    # the first is registered again, the first's next request must handshake afresh, not find
    # its old handshake cached and its peer gone (every read then failed: no such peer).
    cluster = start_cluster()
    first, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    prompts = [list(range(100 + 70 * i, 160 + 70 * i)) for i in range(3)]
    assert _prefill_then_decode(first, decode, "r0", prompts[0], 4) == greedy(prompts[0], 4)
    (second,) = cluster.add_workers(("prefill", "prefill-0"))
    assert _prefill_then_decode(second, decode, "r1", prompts[1], 4) == greedy(prompts[1], 4)
    second.stop()  # deregisters; the first then registers again at its next heartbeat
    cluster.workers.remove(second)
    assert wait_until(lambda: _listed_prefill_address(cluster, "prefill-0") == first.address, timeout=30)
    assert _prefill_then_decode(first, decode, "r2", prompts[2], 4) == greedy(prompts[2], 4)
    stats = decode.stats()
    assert (stats.num_kv_transfers, stats.num_local_prefills) == (3, 0)  # all three moved between the workers
    assert wait_until(lambda: _all_free(first, decode))


def test_a_peer_slower_than_the_threshold_is_refused_and_decode_prefills(start_cluster, greedy):
    # No loopback path moves a million GB/s: the handshake's timed read refuses the peer.
    cluster = start_cluster(worker_args=["--min-kv-gbps", "1000000"])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    client = Client(cluster.address)
    for i in range(3):
        prompt = list(range(10 + 50 * i, 60 + 50 * i))
        assert client.complete(prompt, max_tokens=4, ignore_eos=True, timeout=60).token_ids == greedy(prompt, 4)
    stats = decode.stats()
    assert (stats.num_kv_transfers, stats.num_local_prefills) == (0, 3)
    assert "below --min-kv-gbps 1e+06" in decode.output()
    assert decode.output().count("backing off KV peer") == 1  # refused once, then backed off: no handshake per request
    assert wait_until(lambda: _all_free(prefill, decode))  # the prefill worker let go of every refused request's KV


def test_after_a_timeout_the_peer_is_backed_off_then_probed_and_resumed(start_cluster, greedy):
    backoff = 15.0
    cluster = start_cluster(worker_args=["--transfer-timeout", "2", "--lease-seconds", "60", "--kv-peer-backoff", str(backoff)])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    client = Client(cluster.address)
    client.complete(list(range(500, 540)), max_tokens=2, ignore_eos=True, timeout=60)  # peers have met: one transfer

    # One READ hangs (the prefill process stops after answering) and times out.
    decode.signal(signal.SIGSTOP)
    prompt = list(range(3, 70))
    call = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address)).Generate(
        build_request(prompt, max_tokens=8, ignore_eos=True), timeout=90
    )
    first = next(call)
    prefill.signal(signal.SIGSTOP)
    decode.signal(signal.SIGCONT)
    tokens = list(first.delta.token_ids) + [t for r in call for t in r.delta.token_ids]
    backed_off_at = time.monotonic()
    prefill.signal(signal.SIGCONT)
    assert tokens == greedy(prompt, 8)

    # While backed off, the peer's requests are prefilled on the decode worker without a read.
    for i in range(2):
        p = list(range(100 + 50 * i, 150 + 50 * i))
        assert client.complete(p, max_tokens=4, ignore_eos=True, timeout=60).token_ids == greedy(p, 4)
    assert time.monotonic() - backed_off_at < backoff, "the machine was too slow for this test's backoff window"
    stats = decode.stats()
    assert (stats.num_kv_transfers, stats.num_local_prefills) == (1, 3)
    assert decode.output().count("KV transfer for") == 1  # one timed-out transfer, not one per request
    assert decode.output().count("backing off KV peer") == 1

    # After the backoff one request probes the peer; it reads fine, and transfers resume.
    time.sleep(max(0.0, backoff + 0.5 - (time.monotonic() - backed_off_at)))
    for i in range(2):
        p = list(range(300 + 50 * i, 350 + 50 * i))
        assert client.complete(p, max_tokens=4, ignore_eos=True, timeout=60).token_ids == greedy(p, 4)
    assert decode.stats().num_kv_transfers == 3
    assert wait_until(lambda: _all_free(prefill, decode), timeout=30)
