"""The KV hand-off between real prefill and decode processes over NIXL, and its failure paths.

Every test ends by checking that no KV block is leaked on either side.
"""
from __future__ import annotations

import signal

import grpc

from splitserve.client import Client, build_request
from splitserve.testing.cluster import wait_until
from splitserve.v1 import generation_pb2_grpc


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
    (prefill,) = cluster.add_workers(("prefill", "prefill-bf16"), extra=["--dtype", "bfloat16"])
    (decode,) = cluster.add_workers(("decode", "decode-0"))
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
    (prefill,) = cluster.add_workers(("prefill", "prefill-bs8"), extra=["--block-size", "8"])
    (decode,) = cluster.add_workers(("decode", "decode-0"))
    prompt = list(range(3, 50))
    result = Client(cluster.address).complete(prompt, max_tokens=4, ignore_eos=True, timeout=60)
    assert result.token_ids == greedy(prompt, 4)  # the decode worker prefilled it itself
    assert prefill.stats().num_requests_finished == 0 and decode.stats().num_local_prefills == 1
    assert "block_size 8" in cluster.router.output()
