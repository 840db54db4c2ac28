"""Tensor parallelism inside one worker: one process per rank, rank 0 drives the others.

``TPModelRunner`` (rank 0) stands in for a ModelRunner; ``splitserve.parallel.rank`` is
the other ranks' process; ``protocol`` is what they say to each other; ``KVGroup`` moves a
worker's KV, one head shard per rank, to and from workers of any TP size.
"""
from splitserve.parallel.group import RankFailedError, TPOptions
from splitserve.parallel.kv_group import KVGroup, PeerWorker, RankAgent
from splitserve.parallel.runner import KVAgentSpec, TPModelRunner, make_runner

__all__ = ["KVAgentSpec", "KVGroup", "PeerWorker", "RankAgent", "RankFailedError", "TPModelRunner", "TPOptions", "make_runner"]
