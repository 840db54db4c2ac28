"""``python -m splitserve.planner``: scale the prefill and decode Deployments from their metrics."""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from splitserve.planner.sleep import RouterSleepAPI, SleepFirstScaler
from splitserve.planner.decision import Planner
from splitserve.planner.kube import DeploymentScaler
from splitserve.planner.loop import PlannerTelemetry, PoolHandle, run_forever, run_once
from splitserve.planner.policy import POOLS, PolicyError, load_policies
from splitserve.planner.sources import PodScrapeSource, PrometheusSource, http_get
from splitserve.planner.split import SplitPlanner, SplitRound, WorkloadMeter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve planner", description=__doc__)
    p.add_argument("--namespace", required=True)
    p.add_argument("--prefill-deployment", required=True)
    p.add_argument("--decode-deployment", required=True)
    p.add_argument("--policy", help="YAML with the pools' bounds, cooldowns and targets (defaults when left out)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between rounds")
    p.add_argument("--metrics-source", choices=["pods", "prometheus"], default="pods")
    p.add_argument("--prometheus-url", help="Prometheus base URL, for --metrics-source=prometheus")
    for pool in POOLS:
        p.add_argument(f"--prometheus-selector-{pool}",
                       help=f'label matcher for the {pool} pods (default: namespace and pod name prefix)')
    s = p.add_argument_group("split (the simulator sizes both pools for the observed workload)")
    s.add_argument("--split-profile", help="profile JSON of the workers (splitserve profile); turns the split planner on")
    s.add_argument("--split-slo", nargs="+", default=["ttft:500", "tpot:25"], metavar="KEY:MS",
                   help="the SLOs a split is judged by, as bench serve --goodput takes them")
    s.add_argument("--router-metrics-url", help="the router's /metrics (where the workload is observed), with --split-profile")
    s.add_argument("--split-min-requests", type=int, default=200, help="finished requests per observation window")
    s.add_argument("--split-min-attainment", type=float, default=0.95,
                   help="the smallest budget whose best split keeps this share of requests within the SLOs wins")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then the usual lookup)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve the planner's own /metrics here (0: off)")
    p.add_argument("--dry-run", action="store_true", help="log decisions, change nothing")
    p.add_argument("--once", action="store_true", help="run one round and exit")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--sleep-router-url", help="scale down by putting workers to sleep through this router's HTTP "
                   "address (its /sleep, /wake_up), and scale up by waking them before adding pods")
    p.add_argument("--sleep-level", type=int, choices=(1, 2), default=1, help="1: weights to host memory; 2: dropped")
    p.add_argument("--max-sleeping", type=int, default=1, help="sleeping workers kept per pool; past it pods are removed")
    p.add_argument("--router-api-key-file", help="file holding a worker key (the router's --worker-keys-file), for --sleep-router-url: "
                   "the sleep routes refuse clients' API keys")
    return p


def _kubernetes_apis(kubeconfig: str | None):
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.AppsV1Api(), client.CoreV1Api()


def build_pools(args: argparse.Namespace, apps_api, core_api) -> list[PoolHandle]:
    pools = []
    for pool in POOLS:
        deployment = getattr(args, f"{pool}_deployment")
        scaler = DeploymentScaler(apps_api, core_api, args.namespace, deployment)
        if args.metrics_source == "prometheus":
            selector = getattr(args, f"prometheus_selector_{pool}") or \
                f'namespace="{args.namespace}",pod=~"{deployment}-[a-z0-9]+-[a-z0-9]+"'
            source = PrometheusSource(args.prometheus_url, selector, window=f"{max(int(args.interval * 4), 60)}s")
        else:
            source = PodScrapeSource(scaler.list_metrics_targets)
        if args.sleep_router_url:
            key = open(args.router_api_key_file).read().strip() if args.router_api_key_file else None
            scaler = SleepFirstScaler(scaler, RouterSleepAPI(args.sleep_router_url, key), pool,
                                      level=args.sleep_level, max_sleeping=args.max_sleeping)
        pools.append(PoolHandle(pool, scaler, source))
    return pools


def build_split(args: argparse.Namespace, policies) -> SplitRound:
    from splitserve.bench.metrics import parse_goodput
    from splitserve.profile.schema import Profile

    planner = SplitPlanner(Profile.load(args.split_profile), parse_goodput(args.split_slo),
                           min_attainment=args.split_min_attainment)
    bounds = {pool: (policies[pool].min_replicas, policies[pool].max_replicas) for pool in POOLS}
    url = args.router_metrics_url
    return SplitRound(planner, WorkloadMeter(args.split_min_requests), lambda: http_get(url, 5.0), bounds)


def run_planner(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metrics_source == "prometheus" and not args.prometheus_url:
        parser.error("--prometheus-url is required with --metrics-source=prometheus")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policies = load_policies(args.policy)
    except (PolicyError, OSError) as e:
        parser.error(f"--policy: {e}")

    split = None
    if args.split_profile:
        if not args.router_metrics_url:
            parser.error("--split-profile needs --router-metrics-url")
        try:
            split = build_split(args, policies)
        except (ValueError, OSError) as e:
            parser.error(f"--split-profile: {e}")

    apps_api, core_api = _kubernetes_apis(args.kubeconfig)
    pools = build_pools(args, apps_api, core_api)
    # Samples older than a few rounds mean the source is stuck, not that load is steady.
    planner = Planner(policies, max_sample_age_s=3 * args.interval)
    telemetry = PlannerTelemetry()
    if args.once:
        for d in run_once(planner, pools, dry_run=args.dry_run, telemetry=telemetry, split=split):
            print(f"{d.pool}: {d.current_replicas} -> {d.desired_replicas} ({d.reason})")
        return 0
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=telemetry.registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.getLogger("splitserve.planner").info(
        "planning %s in %s every %gs from %s%s", ", ".join(f"{p.name}={p.scaler.name}" for p in pools),
        args.namespace, args.interval, args.metrics_source, " (dry run)" if args.dry_run else "")
    run_forever(planner, pools, interval_s=args.interval, stop=stop, dry_run=args.dry_run, telemetry=telemetry, split=split)
    return 0
