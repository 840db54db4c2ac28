"""An independent HTTP load client: the official ``openai`` package (its AsyncOpenAI over httpx)
streaming /v1/completions, none of splitserve's benchmark code. It checks `bench serve
--backend openai-completions` from outside: same workload shape (random token-id prompts,
fixed output length, all sent at once or at a rate), its own timing.

    python bench/openai_sdk_client.py --base-url http://127.0.0.1:8000/v1 --num-prompts 500 \\
        --input-len 512 --output-len 128 --out result.json

Metrics as vLLM's benchmark defines them: TTFT is send -> first streamed event with a choice;
TPOT is (last such event - first) / (completion tokens - 1), completion tokens from usage.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np
import openai

try:  # openai 3.x is built on httpx2; older releases on httpx
    import httpx2 as httpx
except ImportError:
    import httpx


async def one(client: openai.AsyncOpenAI, model: str, prompt: list[int], output_len: int) -> dict:
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=output_len, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    return {"start": start, "times": times, "completion_tokens": usage.completion_tokens if usage else 0}


async def run(args: argparse.Namespace) -> dict:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None), timeout=args.timeout, trust_env=False)
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="unused", max_retries=0, http_client=http)
    card = (await client.models.list()).data[0]
    vocab_size = getattr(card, "vocab_size", None) or args.vocab_size
    eos = set(getattr(card, "eos_token_ids", None) or [])
    rng = np.random.default_rng(args.seed)
    allowed = np.array([t for t in range(vocab_size) if t not in eos])
    prompts = [rng.choice(allowed, args.input_len).tolist() for _ in range(args.num_prompts)]
    gaps = np.zeros(args.num_prompts) if args.request_rate == float("inf") else rng.exponential(1 / args.request_rate, args.num_prompts)
    started = time.perf_counter()
    tasks = []
    for prompt, gap in zip(prompts, gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(client, card.id, prompt, args.output_len)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    duration = time.perf_counter() - started
    await http.aclose()
    ok = [r for r in results if isinstance(r, dict) and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (r["completion_tokens"] - 1) for r in ok if r["completion_tokens"] > 1]
    return {
        "client": f"openai-python {openai.__version__}",
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": sum(r["completion_tokens"] for r in ok) / duration,
        "mean_ttft_ms": 1000 * float(np.mean(ttft)) if ttft else None,
        "mean_tpot_ms": 1000 * float(np.mean(tpot)) if tpot else None,
        "mean_events_per_request": float(np.mean([len(r["times"]) for r in ok])) if ok else None,
        "errors": sorted({repr(r)[:200] for r in results if isinstance(r, BaseException)})[:5],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="the server's OpenAI API, http://HOST:PORT/v1")
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--vocab-size", type=int, default=0, help="for servers whose model card does not say")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
