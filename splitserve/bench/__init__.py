"""The serving benchmark: drives the public Generation API under load and reports
TTFT, TPOT, ITL, end-to-end latency, throughput and goodput as `vllm bench serve` does.

Entry point: ``splitserve.bench.serve.main(argv)``.
"""
