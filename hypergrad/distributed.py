r"""Keeping a solve consistent across ``torch.distributed`` ranks.

When each rank holds a shard of the data and the loss is a mean over examples, the global
gradient and every global Hessian-vector product are the means of the per-rank ones. Averaging
the right-hand side and every operator product across ranks makes all ranks solve the *same*
system, so their solutions agree without ever exchanging parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._operator import LinearOperator
from ._tree import Tree

__all__ = ["DistributedOperator", "all_reduce_mean", "is_distributed"]


def is_distributed(group: Any = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_mean(tree: Mapping[str, Tensor], group: Any = None) -> Tree:
    """Mean of a tree over the ranks of ``group``, in one collective (leaves packed per dtype).

    Returns the tree unchanged (same tensors) when not running distributed.
    """
    if not is_distributed(group):
        return dict(tree)
    world = dist.get_world_size(group)
    out: Tree = {}
    by_dtype: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for k, v in tree.items():
        by_dtype.setdefault((v.dtype, v.device), []).append(k)
    for keys in by_dtype.values():
        flat = torch.cat([tree[k].reshape(-1) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat / world
        for k, part in zip(keys, torch.split(flat, [tree[k].numel() for k in keys]), strict=True):
            out[k] = part.reshape(tree[k].shape)
    return {k: out[k] for k in tree}


@dataclass(frozen=True, eq=False)
class DistributedOperator(LinearOperator):
    """``base`` with every product averaged across ranks (one all-reduce per product)."""

    base: LinearOperator
    group: Any = None

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.base.symmetric

    @property
    def positive_definite(self) -> bool:  # type: ignore[override]
        return self.base.positive_definite

    def mv(self, x: Tree) -> Tree:
        return all_reduce_mean(self.base.mv(x), self.group)

    def matmat(self, X: Tree) -> Tree:
        return all_reduce_mean(self.base.matmat(X), self.group)
