"""Between an ``nn.Module`` and the (params, buffers) trees that hypergrad works on."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from ._tree import Tree

__all__ = ["functional", "module_buffers", "module_params"]


def module_params(
    module: nn.Module, *, include: Iterable[str] | None = None, trainable_only: bool = True
) -> Tree:
    """The module's parameters as a tree (references, not copies).

    Args:
        module: the model.
        include: optional name prefixes to keep (e.g. ``["backbone."]``).
        trainable_only: drop parameters with ``requires_grad=False``.
    """
    prefixes = tuple(include) if include is not None else None
    return {
        name: p
        for name, p in module.named_parameters()
        if (not trainable_only or p.requires_grad) and (prefixes is None or name.startswith(prefixes))
    }


def module_buffers(module: nn.Module) -> Tree:
    """The module's buffers (BatchNorm running statistics, counters) as a tree of references."""
    return dict(module.named_buffers())


def functional(module: nn.Module, *, update_buffers: bool = False) -> Callable[..., Any]:
    """A pure function ``f(params, *args, **kwargs)`` that runs ``module`` at ``params``.

    Parameters missing from ``params`` keep the module's own values (constants for hypergrad).
    BatchNorm in train mode normalises with batch statistics either way; the difference is the
    running statistics:

    * ``update_buffers=False`` (default): every call works on fresh copies of the buffers, so
      Hessian-vector products leave the module's running statistics untouched and the function
      is safe under ``torch.func.jvp``/``vmap``.
    * ``update_buffers=True``: the module's buffers are updated in place on every forward, as the
      BiSSL reference code does during its HVPs. Not usable under ``torch.func`` transforms.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> f = functional(net)
        >>> out = f(dict(net.named_parameters()), torch.randn(8, 3))
    """

    def run(params: Tree, *args: Any, **kwargs: Any) -> Any:
        buffers = dict(module.named_buffers())
        if not update_buffers:
            buffers = {k: b.clone() for k, b in buffers.items()}
        state: dict[str, Tensor] = {**dict(module.named_parameters()), **params, **buffers}
        return functional_call(module, state, args, kwargs)

    return run
