"""The shape of a worker's KV cache, and the check that two peers can exchange blocks."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from splitserve.kvtransfer.descriptors import HeadSlice
from splitserve.kvtransfer.errors import BadMetadataError, IncompatiblePeerError

BLOCK_MAJOR = "block_major"

# torch dtype -> the name carried on the wire (proto KVLayout.dtype).
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.uint8: "uint8",
}
_DTYPE_SIZES = {name: torch.empty((), dtype=dt).element_size() for dt, name in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on before its blocks can be copied byte for byte into ours.

    Mirrors proto ``KVLayout``. ``tp_rank`` is which rank's cache this is (the proto carries it
    in ``RankAgent``). Rank r of ``tp_size`` holds the KV heads ``kv_heads_of_rank`` gives it:
    a contiguous range when there are at least as many heads as ranks, else one replicated head.
    Peers of different TP sizes are compatible when they agree on everything but the sharding;
    each decode rank then reads the head slices it needs from the prefill ranks that hold them.
    """

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int  # per TP rank
    head_dim: int
    tp_size: int = 1
    tp_rank: int = 0
    layout: str = BLOCK_MAJOR
    total_num_kv_heads: int = 0  # the model's, over all ranks; 0: num_kv_heads * tp_size (none replicated)
    # An fp8 cache's K/V scales, as a digest (engine/kv_scales.py); "" when the cache has none.
    # Blocks written under other scales would be misread, so peers must agree on it too.
    kv_scales: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_SIZES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(_DTYPE_SIZES)}")
        if not isinstance(self.total_num_kv_heads, int) or self.total_num_kv_heads < 0:
            raise ValueError(f"total_num_kv_heads must be a non-negative integer, got {self.total_num_kv_heads!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, {self.tp_size})")
        if len(self.kv_heads) != self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads {self.num_kv_heads} per rank does not shard {self.num_model_kv_heads} "
                f"KV heads over {self.tp_size} ranks"
            )

    @property
    def num_model_kv_heads(self) -> int:
        return self.total_num_kv_heads or self.num_kv_heads * self.tp_size

    @property
    def kv_heads(self) -> range:
        """The model's KV heads this rank's cache holds, in cache order."""
        return kv_heads_of_rank(self.num_model_kv_heads, self.tp_size, self.tp_rank)

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head inside a block (all layers, K and V): heads are outermost."""
        return self.block_bytes // self.num_kv_heads

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: all layers, K and V, contiguous in the block_major layout."""
        elems = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return elems * _DTYPE_SIZES[self.dtype]

    @classmethod
    def from_kv_cache(
        cls, kv_cache: torch.Tensor, *, model: str, tp_size: int = 1, tp_rank: int = 0,
        total_num_kv_heads: int = 0, kv_scales: str = "",
    ) -> KVLayout:
        """Reads the layout off a cache of shape
        [num_blocks, num_kv_heads, num_layers, 2, block_size, head_dim]; ``total_num_kv_heads``
        is needed only when heads are replicated (fewer KV heads than ranks)."""
        if kv_cache.dim() != 6 or kv_cache.shape[3] != 2:
            raise ValueError(
                "kv_cache must have shape [num_blocks, num_kv_heads, num_layers, 2, block_size, "
                f"head_dim], got {tuple(kv_cache.shape)}"
            )
        if kv_cache.dtype not in _DTYPE_NAMES:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} is not supported")
        _, num_kv_heads, num_layers, _, block_size, head_dim = kv_cache.shape
        return cls(
            model=model,
            dtype=_DTYPE_NAMES[kv_cache.dtype],
            block_size=block_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            tp_size=tp_size,
            tp_rank=tp_rank,
            total_num_kv_heads=total_num_kv_heads,
            kv_scales=kv_scales,
        )

    def check_compatible(self, peer: KVLayout, peer_name: str = "peer") -> None:
        """Raises IncompatiblePeerError naming every field in which ``peer`` differs.

        TP sizes and ranks may differ: what must agree is the model's KV as a whole. When
        the two describe different numbers of KV heads, the sharding fields that differ
        (``num_kv_heads`` per rank, ``tp_size``) are named."""
        mismatches = {
            f.name: (getattr(self, f.name), getattr(peer, f.name))
            for f in fields(self)
            if f.name not in _SHARDING_FIELDS and getattr(self, f.name) != getattr(peer, f.name)
        }
        if self.num_model_kv_heads != peer.num_model_kv_heads:
            named = [n for n in ("num_kv_heads", "tp_size") if getattr(self, n) != getattr(peer, n)]
            for name in named:
                mismatches[name] = (getattr(self, name), getattr(peer, name))
            if not named:
                mismatches["total_num_kv_heads"] = (self.num_model_kv_heads, peer.num_model_kv_heads)
        if mismatches:
            raise IncompatiblePeerError(peer_name, mismatches)


# How the KV is split over ranks: these may differ between compatible peers.
_SHARDING_FIELDS = frozenset({"num_kv_heads", "tp_size", "tp_rank", "total_num_kv_heads"})


def kv_heads_of_rank(total: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads rank ``tp_rank`` of ``tp_size`` holds, as the model's column-parallel
    QKV projection shards them (splitserve.models.layers.ColumnParallelLinear)."""
    if total >= tp_size:
        if total % tp_size:
            raise ValueError(f"{total} KV heads cannot be split over {tp_size} ranks")
        per_rank = total // tp_size
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    if tp_size % total:
        raise ValueError(f"{total} KV heads cannot be replicated over {tp_size} ranks")
    head = tp_rank * total // tp_size
    return range(head, head + 1)


def block_bytes(kv_cache: torch.Tensor) -> int:
    """Bytes of one block of a block_major cache tensor."""
    return kv_cache[0].numel() * kv_cache.element_size()


def plan_head_slices(local: KVLayout, remote_ranks: list[KVLayout], peer_name: str = "peer") -> list[HeadSlice]:
    """What ``local`` (one rank) reads from a peer whose ranks have ``remote_ranks`` (in rank
    order): for each of its heads, the peer rank that holds it, preferring the rank of the
    same index (equal TP sizes map rank to rank); consecutive heads from one rank merge.
    Raises IncompatiblePeerError for a layout that cannot be mapped, BadMetadataError if
    the ranks are not one whole TP group."""
    for layout in remote_ranks:
        local.check_compatible(layout, peer_name)
    tp_size = remote_ranks[0].tp_size if remote_ranks else 0
    if not remote_ranks or [r.tp_rank for r in remote_ranks] != list(range(tp_size)) or any(r.tp_size != tp_size for r in remote_ranks):
        ranks = [f"{r.tp_rank}/{r.tp_size}" for r in remote_ranks]
        raise BadMetadataError(f"peer {peer_name!r} sent ranks {ranks}, not one whole TP group")
    slices: list[HeadSlice] = []
    for local_head, head in enumerate(local.kv_heads):
        holders = [r for r in remote_ranks if head in r.kv_heads]
        source = next((r for r in holders if r.tp_rank == local.tp_rank % tp_size), holders[0])
        remote_head = source.kv_heads.index(head)
        last = slices[-1] if slices else None
        if (last is not None and last.remote_rank == source.tp_rank
                and last.remote_head + last.num_heads == remote_head and last.local_head + last.num_heads == local_head):
            slices[-1] = last._replace(num_heads=last.num_heads + 1)
        else:
            slices.append(HeadSlice(source.tp_rank, remote_head, local_head, 1))
    return slices
