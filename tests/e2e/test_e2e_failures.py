"""Failure paths with real processes: workers killed or stopped mid-request, a full router, draining."""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from splitserve.client import AsyncClient, Client, build_request
from splitserve.controlplane import connect
from splitserve.testing.cluster import wait_until
from splitserve.v1 import generation_pb2_grpc


def _all_free(service) -> bool:
    s = service.stats()
    return s.num_free_blocks == s.num_total_blocks and s.num_pinned_blocks == 0 and s.num_running == 0 and s.num_waiting == 0


def test_prefill_killed_mid_request_is_retried_on_another(start_cluster):
    cluster = start_cluster()
    stuck, healthy, decode = cluster.add_workers(("prefill", "prefill-stuck"), ("prefill", "prefill-ok"), ("decode", "decode-0"))
    stuck.signal(signal.SIGSTOP)  # requests routed to it hang in its queue...

    async def run():
        client = AsyncClient(cluster.address)
        prompts = [[100 + i] + list(range(3, 40)) for i in range(8)]  # distinct first blocks spread over both
        tasks = [asyncio.ensure_future(client.complete(p, max_tokens=4, ignore_eos=True, timeout=60)) for p in prompts]
        await asyncio.sleep(3)
        stuck.kill()  # ...until it dies: they must move to the other worker, not hang
        try:
            return await asyncio.gather(*tasks)
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(run())
    assert all(r.completion_tokens == 4 for r in results)
    assert time.monotonic() - start < 45
    assert healthy.stats().num_requests_finished == 8  # every prompt ended up prefilled there
    assert wait_until(lambda: _all_free(healthy) and _all_free(decode))


def test_no_prefill_worker_left_means_decode_prefills(start_cluster):
    cluster = start_cluster()
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    prefill.kill()
    result = Client(cluster.address).complete(list(range(3, 50)), max_tokens=3, ignore_eos=True, timeout=60)
    assert result.completion_tokens == 3
    assert decode.stats().num_local_prefills >= 1


def test_decode_killed_mid_stream_errors_and_prefill_releases_pinned_blocks(start_cluster):
    cluster = start_cluster(worker_args=["--lease-seconds", "120"])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    decode.signal(signal.SIGSTOP)  # it will never read the KV the prefill worker pins
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    call = stub.Generate(build_request(list(range(3, 80)), max_tokens=50, ignore_eos=True), timeout=60)
    first = next(call)  # the first token comes from the prefill worker
    assert len(first.delta.token_ids) == 1
    assert wait_until(lambda: prefill.stats().num_pinned_blocks > 0)
    decode.kill()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode worker" in info.value.details()
    # Released at once by the router, long before the 120 s lease would run out.
    assert wait_until(lambda: _all_free(prefill), timeout=10)


def test_lease_expiry_frees_blocks_that_nobody_reads(start_cluster):
    cluster = start_cluster(worker_args=["--lease-seconds", "1"])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    decode.signal(signal.SIGSTOP)
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    call = stub.Generate(build_request(list(range(3, 80)), max_tokens=50, ignore_eos=True), timeout=60)
    next(call)
    assert wait_until(lambda: prefill.stats().num_pinned_blocks > 0)
    # Nobody renews the lease (decode is stopped): the blocks come back on their own.
    assert wait_until(lambda: _all_free(prefill), timeout=10)
    call.cancel()


def test_full_router_answers_resource_exhausted(start_cluster):
    cluster = start_cluster(router_args=["--max-inflight", "2"])
    cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))

    async def run():
        client = AsyncClient(cluster.address)
        try:
            return await asyncio.gather(
                *(client.complete(list(range(3, 30)), max_tokens=200, ignore_eos=True, timeout=60) for _ in range(6)),
                return_exceptions=True,
            )
        finally:
            await client.close()

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert sum(1 for r in results if not isinstance(r, BaseException)) >= 2


def test_short_prompt_skips_the_prefill_worker(start_cluster, e2e_model_dir):
    cluster = start_cluster(router_args=["--prefill-threshold", "32"])
    prefill, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
    client = Client(cluster.address)
    short = client.complete(list(range(3, 13)), max_tokens=6, ignore_eos=True, timeout=60)
    assert prefill.stats().num_requests_finished == 0 and decode.stats().num_local_prefills == 1
    long = client.complete(list(range(3, 83)), max_tokens=6, ignore_eos=True, timeout=60)
    assert prefill.stats().num_requests_finished == 1
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(e2e_model_dir, dtype=torch.float32)
    for prompt, result in ((list(range(3, 13)), short), (list(range(3, 83)), long)):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert result.token_ids == expected[0, len(prompt) :].tolist()


def test_sigterm_drains_in_flight_requests(start_cluster):
    cluster = start_cluster()
    _, decode = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))

    async def run():
        client = AsyncClient(cluster.address)
        try:
            task = asyncio.ensure_future(client.complete(list(range(3, 30)), max_tokens=300, ignore_eos=True, timeout=60))
            await asyncio.sleep(1.0)
            decode.signal(signal.SIGTERM)  # stop taking work, finish what is in flight
            return await task
        finally:
            await client.close()

    result = asyncio.run(run())
    assert result.completion_tokens == 300
    assert decode.proc.wait(timeout=30) == 0


def test_requests_sent_while_a_decode_worker_drains_finish_on_another(start_cluster):
    """Until the router's list drops the draining worker, its Decode stream says it is draining,
    and the router sends new requests to the other decode worker instead of failing them."""
    cluster = start_cluster()
    draining, _ = cluster.add_workers(("decode", "decode-0"), ("decode", "decode-1"))

    async def run():
        client = AsyncClient(cluster.address)
        try:
            first = [asyncio.ensure_future(client.complete(list(range(3, 30)), max_tokens=200, ignore_eos=True, timeout=60))
                     for _ in range(4)]
            await asyncio.sleep(1.0)
            draining.signal(signal.SIGTERM)
            later = []
            for _ in range(10):
                later.append(asyncio.ensure_future(client.complete(list(range(5, 20)), max_tokens=20, ignore_eos=True, timeout=60)))
                await asyncio.sleep(0.1)
            return await asyncio.gather(*first), await asyncio.gather(*later)
        finally:
            await client.close()

    first, later = asyncio.run(run())
    assert [r.completion_tokens for r in first] == [200] * 4
    assert [r.completion_tokens for r in later] == [20] * 10
    assert draining.proc.wait(timeout=30) == 0


def test_sigterm_on_prefill_stops_taking_work_and_lets_go_of_pinned_kv(start_cluster):
    cluster = start_cluster(worker_args=["--lease-seconds", "120"])
    prefill, second, decode = cluster.add_workers(("prefill", "prefill-0"), ("prefill", "prefill-1"), ("decode", "decode-0"))
    decode.signal(signal.SIGSTOP)  # nobody will read what the prefill workers pin
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    calls = [stub.Generate(build_request([200 + i] + list(range(3, 60)), max_tokens=20, ignore_eos=True), timeout=90) for i in range(4)]
    for call in calls:
        next(call)  # the first token: prefill done, KV pinned
    assert wait_until(lambda: prefill.stats().num_pinned_blocks > 0 or second.stats().num_pinned_blocks > 0)
    pinned_on = [w for w in (prefill, second) if w.stats().num_pinned_blocks > 0][0]
    start = time.monotonic()
    pinned_on.signal(signal.SIGTERM)
    # Drained well before the 120 s lease: it deregistered, gave up the unread KV and exited cleanly.
    assert pinned_on.proc.wait(timeout=60) == 0 and time.monotonic() - start < 60
    decode.signal(signal.SIGCONT)
    # Requests whose KV went away are recomputed on the decode worker; new ones avoid the drained worker.
    for call in calls:
        assert sum(len(r.delta.token_ids) for r in call) == 19
    # Stopped for longer than its heartbeat TTL, the decode worker dropped out of the control plane
    # and registers again on its next heartbeat: until the router's list has it back, there is
    # no decode worker to send to.
    assert wait_until(lambda: asyncio.run(_live_decode_workers(cluster)), timeout=15)
    assert Client(cluster.address).complete(list(range(3, 50)), max_tokens=3, ignore_eos=True, timeout=60).completion_tokens == 3


def test_a_full_decode_worker_refuses_with_resource_exhausted_and_keeps_serving(start_cluster):
    """One running and one waiting request fill a decode worker (--max-num-seqs 1
    --max-waiting 1): the next one is refused with RESOURCE_EXHAUSTED at once, the two in
    flight finish whole, the worker takes requests again afterwards and no block is left in use."""
    cluster = start_cluster(worker_args=["--max-num-seqs", "1", "--max-waiting", "1"])
    (decode,) = cluster.add_workers(("decode", "decode-0"))
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    # Long enough that the first is still running when the others arrive, however loaded the
    # machine (a 10 s wait for the second to queue failed once while two suites ran).
    running = stub.Generate(build_request(list(range(3, 20)), max_tokens=1000, ignore_eos=True), timeout=300)
    next(running)  # its first token: it runs
    waiting = stub.Generate(build_request(list(range(4, 21)), max_tokens=1000, ignore_eos=True), timeout=300)
    assert wait_until(lambda: decode.stats().num_waiting == 1, timeout=60)
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.Generate(build_request(list(range(5, 22)), max_tokens=4, ignore_eos=True), timeout=30))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "full" in refused.value.details()
    assert 1 + sum(len(r.delta.token_ids) for r in running) == 1000
    assert sum(len(r.delta.token_ids) for r in waiting) == 1000
    # A full worker is not a failed one: the router sends it the next request at once.
    assert Client(cluster.address).complete(list(range(6, 30)), max_tokens=3, ignore_eos=True, timeout=60).completion_tokens == 3
    stats = decode.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_requests_for_a_decode_worker_that_is_gone_go_to_another(start_cluster):
    """A decode worker killed before the control plane notices: a request the router sends it
    finds nobody listening, never reached it, and goes to the other decode worker."""
    cluster = start_cluster()
    gone, _ = cluster.add_workers(("decode", "decode-0"), ("decode", "decode-1"))
    gone.kill()
    for i in range(6):  # the router's list still has decode-0: some of these are routed to it first
        result = Client(cluster.address).complete([40 + i] + list(range(3, 20)), max_tokens=4, ignore_eos=True, timeout=60)
        assert result.completion_tokens == 4


async def _live_decode_workers(cluster):
    """The decode workers the control plane lists now (what the router's list catches up to)."""
    control_plane = await connect(cluster.control_plane)
    try:
        return await control_plane.live_workers("decode")
    finally:
        await control_plane.close()
