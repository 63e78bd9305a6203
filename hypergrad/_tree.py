"""Trees of tensors: ``dict[str, Tensor]`` with fast elementwise arithmetic.

Parameters travel as ``dict(model.named_parameters())``. Arithmetic uses the fused
``torch._foreach_*`` kernels. *Batched* trees carry a leading dimension ``k`` on every
leaf (``k`` right-hand sides); reductions then return one value per right-hand side.

Krylov scalars (dot products, norms) are accumulated in ``accum_dtype(dtype)``: at least
float32, so bf16/fp16 products never degrade the solver's scalar recurrences.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import torch
from torch import Tensor

from ._errors import TreeMismatchError

Tree: TypeAlias = dict[str, Tensor]

__all__ = [
    "Tree",
    "accum_dtype",
    "check_compatible",
    "check_tree",
    "tree_add",
    "tree_axpy",
    "tree_batch_dot",
    "tree_batch_norm",
    "tree_dot",
    "tree_norm",
    "tree_scale",
    "tree_sub",
    "tree_zeros_like",
]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of Krylov scalars for leaves of ``dtype``: never below float32."""
    if dtype.is_complex:
        return torch.promote_types(dtype, torch.complex64)
    return torch.promote_types(dtype, torch.float32)


def check_tree(tree: object, name: str) -> None:
    """Raise :class:`TreeMismatchError` unless ``tree`` is a non-empty ``dict`` name -> Tensor."""
    if not isinstance(tree, Mapping) or not tree:
        raise TreeMismatchError(
            f"{name} must be a non-empty dict name -> Tensor, got {type(tree).__name__}; "
            f"pass e.g. dict(model.named_parameters())"
        )
    for key, value in tree.items():
        if not isinstance(value, Tensor):
            raise TreeMismatchError(f"{name}[{key!r}] is a {type(value).__name__}, expected a Tensor")


def check_compatible(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    name_a: str,
    name_b: str,
    *,
    batched_b: bool = False,
) -> None:
    """Raise :class:`TreeMismatchError` unless ``a`` and ``b`` have equal keys, shapes, dtypes, devices.

    With ``batched_b`` every leaf of ``b`` has one extra leading dimension.
    """
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        bad = name_a if not isinstance(a, Mapping) else name_b
        value = a if bad == name_a else b
        raise TreeMismatchError(
            f"{bad} must be a dict name -> Tensor, got {type(value).__name__}; "
            f"pass e.g. dict(model.named_parameters())"
        )
    if set(a) != set(b):
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise TreeMismatchError(
            f"{name_b} does not have the keys of {name_a}: missing {missing}, unexpected {extra}; "
            f"build both trees from the same parameters"
        )
    for key, x in a.items():
        y = b[key]
        if not isinstance(y, Tensor):
            raise TreeMismatchError(f"{name_b}[{key!r}] is a {type(y).__name__}, expected a Tensor")
        shape_y = tuple(y.shape[1:]) if batched_b else tuple(y.shape)
        if tuple(x.shape) != shape_y:
            raise TreeMismatchError(
                f"{name_b}[{key!r}] has shape {tuple(y.shape)}, expected "
                f"{'(k, ' + ', '.join(map(str, x.shape)) + ')' if batched_b else tuple(x.shape)} "
                f"to match {name_a}[{key!r}]"
            )
        if x.dtype != y.dtype:
            raise TreeMismatchError(
                f"{name_b}[{key!r}] has dtype {y.dtype}, but {name_a}[{key!r}] has {x.dtype}; "
                f"cast one of them with .to({x.dtype})"
            )
        if x.device != y.device:
            raise TreeMismatchError(
                f"{name_b}[{key!r}] is on {y.device}, but {name_a}[{key!r}] is on {x.device}; "
                f"move them to one device"
            )




def _keys_values(tree: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    return list(tree.keys()), list(tree.values())


def _wrapped(leaves: list[Tensor]) -> bool:
    """Whether to run leaf by leaf instead of the fused kernels: when a ``torch.func`` transform
    wraps the leaves (the fused kernels have no vmap rule), and under ``torch.compile`` (dynamo
    cannot trace the wrapper check, and the compiler fuses the per-leaf operations itself)."""
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in leaves)


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    """``a + b``."""
    keys, va = _keys_values(a)
    vb = [b[k] for k in keys]
    if _wrapped(va + vb):
        return {k: x + y for k, x, y in zip(keys, va, vb, strict=True)}
    return dict(zip(keys, torch._foreach_add(va, vb), strict=True))


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    """``a - b``."""
    keys, va = _keys_values(a)
    vb = [b[k] for k in keys]
    if _wrapped(va + vb):
        return {k: x - y for k, x, y in zip(keys, va, vb, strict=True)}
    return dict(zip(keys, torch._foreach_sub(va, vb), strict=True))


def _broadcast_scalar(s: Tensor, leaf: Tensor) -> Tensor:
    """A per-right-hand-side scalar of shape (k,) reshaped to broadcast against a batched leaf."""
    if s.dim() == 0:
        return s.to(leaf.dtype)
    return s.to(leaf.dtype).reshape(s.shape + (1,) * (leaf.dim() - s.dim()))


def tree_scale(a: Mapping[str, Tensor], s: float | Tensor) -> Tree:
    """``s * a``; ``s`` is a Python number, a 0-d tensor or a (k,) tensor for batched trees."""
    keys, va = _keys_values(a)
    if isinstance(s, Tensor):
        scales = [_broadcast_scalar(s, v) for v in va]
        if _wrapped(va + scales):
            return {k: x * c for k, x, c in zip(keys, va, scales, strict=True)}
        return dict(zip(keys, torch._foreach_mul(va, scales), strict=True))
    if _wrapped(va):
        return {k: x * s for k, x in zip(keys, va, strict=True)}
    return dict(zip(keys, torch._foreach_mul(va, s), strict=True))


def tree_axpy(alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Tree:
    """``alpha * x + y`` (``alpha`` as in :func:`tree_scale`)."""
    return tree_add(tree_scale(x, alpha), y)


def tree_batch_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Per-right-hand-side inner products of batched trees: shape (k,), in :func:`accum_dtype`."""
    total: Tensor | None = None
    for k, x in a.items():
        y = b[k]
        acc = accum_dtype(x.dtype)
        d = (x.to(acc) * y.to(acc)).reshape(x.shape[0], -1).sum(dim=1)
        total = d if total is None else total + d
    if total is None:
        raise TreeMismatchError("cannot take the inner product of an empty tree; pass at least one tensor")
    return total


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Inner product ``sum_k <a[k], b[k]>`` as a 0-d tensor in :func:`accum_dtype` (no host sync)."""
    return tree_batch_dot({k: v.unsqueeze(0) for k, v in a.items()}, {k: v.unsqueeze(0) for k, v in b.items()})[0]


def tree_batch_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Per-right-hand-side Euclidean norms of a batched tree: shape (k,)."""
    return tree_batch_dot(a, a).sqrt()


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of the whole tree as a 0-d tensor."""
    return tree_dot(a, a).sqrt()


def tree_zeros_like(a: Mapping[str, Tensor]) -> Tree:
    """A tree of zeros shaped like ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}
