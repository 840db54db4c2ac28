"""The engine with a tiny model: requests joining mid-run, aborts, and the disaggregated path.

The disaggregated path runs two engines in one process: a "prefill" engine computes the
prompt's KV and holds it (``hold_kv``), a "decode" engine is given the remote block ids
(``remote_kv``) and the first token, asks for the blocks to be loaded (``KVLoad``), and a
plain tensor copy between the two runners' KV caches stands in for the transfer.
"""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.request import FinishReason, TokenLogprob
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import RemoteKV
from splitserve.engine.warmup import warm_up

MAX_NEW = 8
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
PROMPT = [3, 141, 59, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419]  # 14 tokens: 3 full blocks and a partial


def collect(engine, tokens=None):
    tokens = {} if tokens is None else tokens
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def assert_all_blocks_free(engine):
    assert engine.kv_cache_manager.num_requests == 0
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


@pytest.fixture
def reference(llama_tiny_dir, make_engine, hf_reference):
    """One engine doing both prefill and decode (and agreeing with transformers)."""
    engine = make_engine(llama_tiny_dir)
    engine.add_request("r", PROMPT, GREEDY)
    tokens = collect(engine)["r"]
    assert tokens == hf_reference.tokens(llama_tiny_dir, PROMPT, MAX_NEW)
    return tokens


def prefill(engine, request_id="r", prompt=PROMPT):
    """What a prefill worker does: first token only, KV held for pickup."""
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), hold_kv=True)
    (first,) = collect(engine)[request_id]
    return first, engine.get_block_ids(request_id)


def test_requests_joining_mid_run_are_exact(llama_tiny_dir, make_engine, hf_reference):
    engine = make_engine(llama_tiny_dir, max_num_batched_tokens=6)
    prompts = {"a": PROMPT, "b": PROMPT[3:11], "c": PROMPT[::-1]}
    engine.add_request("a", prompts["a"], GREEDY)
    tokens = {}

    def step():
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for _ in range(4):  # a is decoding by now
        step()
    assert 0 < len(tokens["a"]) < MAX_NEW
    engine.add_request("b", prompts["b"], GREEDY)
    step()
    engine.add_request("c", prompts["c"], GREEDY)
    batch = engine.scheduler.schedule
    seen = []
    engine.scheduler.schedule = lambda: seen.append(batch()) or seen[-1]
    collect(engine, tokens)
    assert any({s.request_id for s in out.scheduled} == {"a", "b", "c"} for out in seen)  # all three in one step
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == hf_reference.tokens(llama_tiny_dir, prompt, MAX_NEW)
    assert_all_blocks_free(engine)


def test_abort_frees_blocks_and_spares_the_others(llama_tiny_dir, make_engine, hf_reference):
    engine = make_engine(llama_tiny_dir, max_num_seqs=2)
    engine.add_request("keep", PROMPT, GREEDY)
    engine.add_request("drop", PROMPT[::-1], GREEDY)
    engine.add_request("queued", PROMPT[:5], GREEDY)
    tokens = {}
    for out in engine.step().outputs:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.get_block_ids("drop") and engine.scheduler.waiting[0].request_id == "queued"
    assert engine.abort("drop") and engine.abort("queued")
    assert not engine.abort("drop") and not engine.abort("never-seen")
    assert engine.get_block_ids("drop") == []
    collect(engine, tokens)
    assert tokens["keep"] == hf_reference.tokens(llama_tiny_dir, PROMPT, MAX_NEW)
    assert_all_blocks_free(engine)


# -- the disaggregated path -------------------------------------------------------------


def copy_blocks(src, dst, load):
    """Stands in for the KV transfer: whole blocks, all layers, from one runner's cache to the other's."""
    assert len(load.local_block_ids) == len(load.remote_block_ids)
    dst.runner.kv_cache[torch.tensor(load.local_block_ids)] = src.runner.kv_cache[torch.tensor(load.remote_block_ids)]


def start_decode(engine, first, remote_block_ids, request_id="r", prompt=PROMPT):
    engine.add_request(
        request_id, prompt, GREEDY, remote_kv=RemoteKV(remote_block_ids, len(prompt)), first_token=TokenLogprob(first, 0.0)
    )
    result = engine.step()
    assert result.outputs == []  # nothing runs until the KV is there
    (load,) = result.kv_loads
    return load


def test_remote_kv_continues_exactly(llama_tiny_dir, make_engine, reference):
    prefill_engine, decode_engine = make_engine(llama_tiny_dir), make_engine(llama_tiny_dir)
    decode_engine.block_pool.get_new_blocks(5)  # so that local and remote block ids differ
    first, remote_blocks = prefill(prefill_engine)
    assert first == reference[0] and len(remote_blocks) == 4

    load = start_decode(decode_engine, first, remote_blocks)
    assert load.request_id == "r" and load.num_tokens == len(PROMPT)
    assert load.remote_block_ids == remote_blocks
    assert load.local_block_ids == decode_engine.get_block_ids("r")[:4]
    assert not set(load.local_block_ids) & set(range(5))
    assert decode_engine.step().outputs == []  # still loading
    copy_blocks(prefill_engine, decode_engine, load)
    decode_engine.finish_kv_load("r", ok=True)
    tokens = collect(decode_engine)

    assert [first] + tokens["r"] == reference
    assert decode_engine.scheduler.num_prompt_tokens_computed == 0  # the prompt was never computed here
    decode_engine.block_pool.free_blocks(decode_engine.block_pool.blocks[:5])
    assert_all_blocks_free(decode_engine)
    assert prefill_engine.release("r")
    assert_all_blocks_free(prefill_engine)


def test_remote_kv_after_a_local_prefix_hit_loads_only_the_rest(llama_tiny_dir, make_engine, reference, hf_reference):
    prefill_engine, decode_engine = make_engine(llama_tiny_dir), make_engine(llama_tiny_dir)
    first, remote_blocks = prefill(prefill_engine)
    other = PROMPT[:9] + [7, 7, 7]  # shares two full blocks with PROMPT
    decode_engine.add_request("earlier", other, GREEDY)
    assert collect(decode_engine)["earlier"] == hf_reference.tokens(llama_tiny_dir, other, MAX_NEW)

    load = start_decode(decode_engine, first, remote_blocks)
    assert load.remote_block_ids == remote_blocks[2:]
    assert load.local_block_ids == decode_engine.get_block_ids("r")[2:4]
    copy_blocks(prefill_engine, decode_engine, load)
    decode_engine.finish_kv_load("r", ok=True)
    assert [first] + collect(decode_engine)["r"] == reference
    assert_all_blocks_free(decode_engine)


def test_failed_kv_load_falls_back_to_local_prefill(llama_tiny_dir, make_engine, reference):
    prefill_engine, decode_engine = make_engine(llama_tiny_dir), make_engine(llama_tiny_dir)
    first, remote_blocks = prefill(prefill_engine)
    start_decode(decode_engine, first, remote_blocks)
    decode_engine.finish_kv_load("r", ok=False)  # nothing was copied
    tokens = collect(decode_engine)
    assert [first] + tokens["r"] == reference
    assert decode_engine.scheduler.num_prompt_tokens_computed == len(PROMPT)
    assert_all_blocks_free(decode_engine)


def test_failed_kv_load_quarantines_blocks_a_late_transfer_may_write(llama_tiny_dir, make_engine, reference):
    prefill_engine = make_engine(llama_tiny_dir)
    decode_engine = make_engine(llama_tiny_dir, num_blocks=12)
    first, remote_blocks = prefill(prefill_engine)
    load = start_decode(decode_engine, first, remote_blocks)
    quarantine = frozenset(load.local_block_ids)
    decode_engine.finish_kv_load("r", ok=False, quarantine=quarantine)
    handed_out = set()
    while decode_engine.has_unfinished:
        decode_engine.step()
        handed_out |= {b for blocks in decode_engine.kv_cache_manager.req_to_blocks.values() for b in (x.block_id for x in blocks)}
    assert not handed_out & quarantine
    assert decode_engine.block_pool.num_free_blocks == 12 - len(quarantine)
    decode_engine.free_quarantined(sorted(quarantine))
    assert_all_blocks_free(decode_engine)


def test_held_kv_stays_until_released(llama_tiny_dir, make_engine, hf_reference):
    engine = make_engine(llama_tiny_dir, num_blocks=16)
    first, held = prefill(engine)
    assert not engine.has_unfinished  # finished, yet its blocks are pinned
    assert all(engine.block_pool.blocks[b].ref_cnt == 1 for b in held)
    assert engine.block_pool.num_free_blocks == 16 - len(held)
    snapshot = engine.runner.kv_cache[torch.tensor(held)].clone()

    # Others run meanwhile, under pressure: they never get the held blocks, whose KV stays intact.
    other = [900 + i for i in range(10)]
    engine.add_request("other", other, GREEDY)
    used = set()
    while engine.has_unfinished:
        engine.step()
        used |= set(engine.get_block_ids("other"))
    assert not used & set(held)
    assert torch.equal(engine.runner.kv_cache[torch.tensor(held)], snapshot)

    assert engine.release("r") and not engine.release("r")
    assert_all_blocks_free(engine)


def test_abort_while_loading_frees_the_local_blocks(llama_tiny_dir, make_engine):
    prefill_engine, decode_engine = make_engine(llama_tiny_dir), make_engine(llama_tiny_dir)
    first, remote_blocks = prefill(prefill_engine)
    start_decode(decode_engine, first, remote_blocks)
    assert decode_engine.abort("r")
    decode_engine.finish_kv_load("r", ok=True)  # the transfer ends after the abort: ignored
    assert not decode_engine.has_unfinished
    assert_all_blocks_free(decode_engine)
    assert prefill_engine.abort("r")
    assert_all_blocks_free(prefill_engine)


def test_first_token_counts_toward_max_tokens(llama_tiny_dir, make_engine, reference):
    prefill_engine, decode_engine = make_engine(llama_tiny_dir), make_engine(llama_tiny_dir)
    first, remote_blocks = prefill(prefill_engine)
    load = start_decode(decode_engine, first, remote_blocks)
    copy_blocks(prefill_engine, decode_engine, load)
    decode_engine.finish_kv_load("r", ok=True)
    outputs = []
    while decode_engine.has_unfinished:
        outputs += decode_engine.step().outputs
    assert len(outputs) == MAX_NEW - 1 and outputs[-1].finish_reason == FinishReason.LENGTH


def test_warm_up_leaves_no_trace(llama_tiny_dir, make_engine, reference):
    """The warm-up steps write KV into scratch blocks before any is allocated: afterwards every
    block is free and a request's output (which reuses those blocks) is unchanged."""
    engine = make_engine(llama_tiny_dir)
    assert warm_up(engine.runner, max_num_seqs=4) > 0
    assert_all_blocks_free(engine)
    engine.add_request("r", PROMPT, GREEDY)
    assert collect(engine)["r"] == reference
    assert_all_blocks_free(engine)
