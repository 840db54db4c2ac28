"""EngineSleep on the CPU: the KV cache's memory goes and comes back, the weights are kept
(level 1) or dropped and reloaded (level 2), and the engine is token-exact after waking."""
from __future__ import annotations

import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sleep import EngineSleep

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
PROMPT = [3, 141, 59, 265, 358, 979, 323, 846, 264, 338]


def run(engine, request_id, prompt=PROMPT):
    engine.add_request(request_id, prompt, GREEDY)
    tokens = []
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_the_cache_and_wake_is_token_exact(llama_tiny_dir, make_engine, hf_reference, level):
    engine = make_engine(llama_tiny_dir, num_blocks=16)
    expected = hf_reference.tokens(llama_tiny_dir, PROMPT, 5)
    assert run(engine, "a") == expected
    assert engine.block_pool.cached  # the prompt's blocks are cached
    kv = engine.runner.kv_cache
    nbytes = kv.untyped_storage().nbytes()
    sleep = EngineSleep(engine)
    sleep.sleep(level)
    assert sleep.level == level and kv.untyped_storage().nbytes() == 0
    assert not engine.block_pool.cached and engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    assert (engine.runner.model is None) == (level == 2)
    with pytest.raises(RuntimeError, match="already asleep"):
        sleep.sleep(1)
    sleep.wake()
    assert sleep.level == 0 and engine.runner.kv_cache is kv and kv.untyped_storage().nbytes() == nbytes
    assert run(engine, "b") == expected  # computed afresh: nothing was cached across the sleep
    with pytest.raises(RuntimeError, match="not asleep"):
        sleep.wake()


def test_sleep_refuses_with_requests_or_a_bad_level(llama_tiny_dir, make_engine):
    engine = make_engine(llama_tiny_dir, num_blocks=16)
    sleep = EngineSleep(engine)
    with pytest.raises(ValueError, match="level"):
        sleep.sleep(3)
    engine.add_request("a", PROMPT, GREEDY)
    with pytest.raises(RuntimeError, match="still has requests"):
        sleep.sleep(1)
    assert sleep.level == 0 and engine.runner.kv_cache.untyped_storage().nbytes() > 0
