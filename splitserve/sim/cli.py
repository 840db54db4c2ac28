"""``splitserve sim``: a serving layout under a ``bench serve`` workload, simulated from
profiles; prints and writes what ``bench serve`` would (same metrics, same JSON schema)."""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from splitserve.bench.config import parse_percentiles, parse_rates
from splitserve.bench.metrics import parse_goodput
from splitserve.bench.report import format_point, format_summary, results_document, write_json
from splitserve.profile.schema import Profile
from splitserve.services.router.placement import EngineBudget, PlacementPolicy, parse_slo
from splitserve.sim.cluster import Layout, Overheads
from splitserve.sim.run import parse_layout, simulate
from splitserve.sim.worker import EngineLimits
from splitserve.sim.workload import WorkloadSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default=None, help="NPMD (N prefill + M decode workers) or NC (N colocated engines), e.g. 1P1D, 3P1D, 2C")
    p.add_argument("--plan-gpus", type=int, default=None,
                   help="instead of --layout: rank every layout of this many GPUs (colocated, each P:D split, and adaptive) "
                   "by its best goodput over --request-rate at --goodput's SLOs")
    p.add_argument("--seconds-per-rate", type=float, default=10.0, help="with --plan-gpus: prompts per rate = rate x this")
    p.add_argument("--profile", type=Path, required=True, help="profile JSON of the decode (and colocated) workers")
    p.add_argument("--prefill-profile", type=Path, default=None, help="profile JSON of the prefill workers (default: --profile)")
    p.add_argument("--placement", choices=("remote", "threshold", "adaptive"), default="remote")
    p.add_argument("--prefill-threshold", type=int, default=0, help="with --placement threshold: shorter prompts prefill on the decode worker")
    p.add_argument("--placement-slo", default="ttft:500,itl:50", help="with --placement adaptive: the SLOs placement keeps, ms")
    p.add_argument("--mixed", action="store_true",
                   help="with --placement adaptive: decode workers in a mixed role (decode --accept-prefill) prefill for each other "
                   "while they have headroom")
    e = p.add_argument_group("workers (the flags every worker runs with)")
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=8192)
    e.add_argument("--prefill-max-num-batched-tokens", type=int, default=None, help="prefill pool's budget (default: the same)")
    e.add_argument("--num-blocks", type=int, default=50_000, help="KV blocks per worker")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--dispatch-ms", type=float, default=0.0, help="router -> worker latency per hop")
    e.add_argument("--stream-ms", type=float, default=0.0, help="sampled token -> client latency")
    e.add_argument("--router-message-us", type=float, default=0.0,
                   help="the router's event loop per admission and per message to a client; its queue and merging are "
                   "modelled (splitserve/sim/router_loop.py); 0: left out")
    w = p.add_argument_group("workload (as bench serve takes it; random dataset)")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=int, default=1024)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--range-ratio", type=float, default=0.0)
    w.add_argument("--prefix-len", type=int, default=0)
    w.add_argument("--num-prefixes", type=int, default=1)
    w.add_argument("--request-rate", default="1", help="requests/s, comma-separated to sweep")
    w.add_argument("--burstiness", type=float, default=1.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--vocab-size", type=int, default=128256, help="the model's (the random prompts' draws depend on it)")
    r = p.add_argument_group("results")
    r.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS")
    r.add_argument("--percentiles", default="50,90,99")
    r.add_argument("--out", type=Path, default=None, help="write LABEL.json here, in bench serve's schema")
    r.add_argument("--label", default="sim")
    r.add_argument("--quiet", action="store_true", help="the summary table only")
    return p


def layout_from_args(args: argparse.Namespace) -> Layout:
    if args.plan_gpus is not None:
        args = argparse.Namespace(**{**vars(args), "layout": f"1P{args.plan_gpus}D", "placement": "adaptive"})
    elif args.layout is None:
        raise ValueError("give --layout, or --plan-gpus to compare layouts")
    num_prefill, num_decode = parse_layout(args.layout)
    decode = Profile.load(args.profile)
    prefill = Profile.load(args.prefill_profile) if args.prefill_profile else decode
    limits = EngineLimits(args.max_num_seqs, args.max_num_batched_tokens, args.num_blocks, decode.block_size,
                          not args.no_prefix_caching)
    prefill_limits = replace(limits, max_num_batched_tokens=args.prefill_max_num_batched_tokens or args.max_num_batched_tokens)
    policy = None
    if args.placement == "adaptive":
        policy = PlacementPolicy(prefill, decode, parse_slo(args.placement_slo),
                                 EngineBudget(prefill_limits.max_num_batched_tokens, prefill.block_size),
                                 EngineBudget(limits.max_num_batched_tokens, decode.block_size))
    return Layout(num_prefill, num_decode, prefill if num_prefill else None, decode, limits, prefill_limits,
                  args.placement, args.prefill_threshold, Overheads(args.dispatch_ms, args.stream_ms, args.router_message_us), policy,
                  mixed=args.mixed and args.plan_gpus is None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        layout = layout_from_args(args)
        slos = parse_goodput(args.goodput)
        percentiles = parse_percentiles(args.percentiles)
        specs = [WorkloadSpec(args.num_prompts, args.input_len, args.output_len, rate, args.range_ratio, args.prefix_len,
                              args.num_prefixes, args.burstiness, args.seed, args.vocab_size) for rate in parse_rates(args.request_rate)]
        for spec in specs:
            spec.dataset()  # validates the lengths before anything runs
    except (ValueError, OSError) as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plan_gpus is not None:
        return _plan(args, layout, specs, slos)
    points = [simulate(layout, spec, percentiles, slos) for spec in specs]
    results = [p.result for p in points]
    for p in points:
        if not args.quiet:
            print(format_point(p.result.point, args.burstiness, p.result.metrics))
        placements = ", ".join(f"{k}={v}" for k, v in sorted(p.sim.placements.items()))
        print(f"{p.result.point.label()}: {layout.num_gpus} GPUs, placements {placements}, KV transfers {p.sim.kv_transfers}")
    print(format_summary(results, max(percentiles)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        config = {"command": "splitserve sim " + shlex.join(argv), "simulated": True}
        write_json(args.out / f"{args.label}.json", results_document(config, {"layout": args.layout}, results))
        print(f"wrote {args.out / args.label}.json")
    return 0


def _plan(args: argparse.Namespace, adaptive: Layout, specs: list[WorkloadSpec], slos: dict[str, float]) -> int:
    from splitserve.sim.plan import rank

    if not slos:
        print("error: --plan-gpus needs --goodput SLOs", file=sys.stderr)
        return 2
    base = replace(adaptive, placement="remote", placement_policy=None)
    ranked = rank(args.plan_gpus, base, adaptive, specs[0], [s.request_rate for s in specs], args.seconds_per_rate, slos)
    print(f"{'layout':<20}{'goodput req/s':>15}{'at rate':>9}")
    for c in ranked:
        print(f"{c.label:<20}{c.goodput:>15.2f}{c.rate:>9g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
