"""Model conditioning as nested structures: the `cond`/`uncond` keyword arguments of a model call.

A conditioning is a dict of model keyword arguments whose values may nest dicts, lists and
tuples to any depth (diffusers passes `added_cond_kwargs={"text_embeds", "time_ids"}`, a
ControlNet's residuals as a list of tensors). The rules:

* a tensor leaf is batched along dim 0 with one row per sample; with classifier-free
  guidance the model sees [uncond; cond] concatenated along dim 0, leaf by leaf, so cond
  and uncond must have the same structure and leaves of the same trailing shape;
* a non-tensor leaf (a float, a string option, None) passes to the model unchanged; with
  guidance it must be equal in cond and uncond (one batched call sees one value);
* the static copies a CUDA graph reads are re-filled before every replay (`copy_into`), and
  the structure, shapes, dtypes and non-tensor values are part of the runner's cache key
  (`signature`): a replay never sees a stale option.

Errors name the leaf by its path, as `cond['added_cond_kwargs']['time_ids']`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

CONTAINERS = (dict, list, tuple)


def _children(node):
    return node.items() if isinstance(node, dict) else enumerate(node)


def _rebuild(node, values):
    if isinstance(node, dict):
        return dict(zip(node.keys(), values))
    return type(node)(values) if not hasattr(node, "_fields") else type(node)(*values)  # namedtuples too


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree):
    """The same structure with fn applied to every tensor leaf; other leaves as they are."""
    if torch.is_tensor(tree):
        return fn(tree)
    if isinstance(tree, CONTAINERS):
        return _rebuild(tree, [map_tensors(fn, v) for _, v in _children(tree)])
    return tree


def zip_tensors(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a, b):
    """fn(a_leaf, b_leaf) at every tensor leaf of two trees of one structure (see `check`)."""
    if torch.is_tensor(a):
        return fn(a, b)
    if isinstance(a, CONTAINERS):
        return _rebuild(a, [zip_tensors(fn, v, w) for (_, v), (_, w) in zip(_children(a), _children(b))])
    return a


def leaves(tree, path: str = "cond") -> list[tuple[str, object]]:
    """(path, leaf) for every leaf, depth first, paths as `cond['a'][0]`."""
    if isinstance(tree, CONTAINERS):
        return [item for k, v in _children(tree) for item in leaves(v, f"{path}[{k!r}]")]
    return [(path, tree)]


def _check_batched(tree, name: str, batch: int) -> None:
    for path, leaf in leaves(tree, name):
        if torch.is_tensor(leaf) and (leaf.ndim == 0 or leaf.shape[0] != batch):
            got = "a 0-d tensor" if leaf.ndim == 0 else f"shape {tuple(leaf.shape)}"
            raise ValueError(f"{path} must be batched along dim 0 with {batch} rows, got {got}")


def _check_same(cond, uncond, path: str) -> None:
    """cond and uncond of one structure, tensor leaves of equal trailing shapes, other leaves equal."""
    upath = "uncond" + path[len("cond"):]
    if isinstance(cond, CONTAINERS) or isinstance(uncond, CONTAINERS):
        if type(cond) is not type(uncond):
            raise ValueError(f"{path} is a {type(cond).__name__} but {upath} is a {type(uncond).__name__}: "
                             "cond and uncond must have the same structure")
        if isinstance(cond, dict):
            if set(cond) != set(uncond):
                raise ValueError(f"{path} and {upath} must have the same keys, got {sorted(map(repr, cond))} "
                                 f"and {sorted(map(repr, uncond))}")
            for k in cond:
                _check_same(cond[k], uncond[k], f"{path}[{k!r}]")
        else:
            if len(cond) != len(uncond):
                raise ValueError(f"{path} and {upath} must have the same length, got {len(cond)} and {len(uncond)}")
            for i, (c, u) in enumerate(zip(cond, uncond)):
                _check_same(c, u, f"{path}[{i!r}]")
    elif torch.is_tensor(cond) or torch.is_tensor(uncond):
        if not (torch.is_tensor(cond) and torch.is_tensor(uncond)):
            raise ValueError(f"{path} and {upath} must both be tensors or both not")
        if cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(f"{path} and {upath} must have the same shape after dim 0, got "
                             f"{tuple(cond.shape)} and {tuple(uncond.shape)}")
    elif not _equal(cond, uncond):
        raise ValueError(f"{path}={cond!r} and {upath}={uncond!r} differ: a non-tensor argument is passed "
                         "unchanged to the one batched [uncond; cond] call, so it must be the same in both")


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays without a truth value
        return a is b


def check(cond, uncond, batch: int) -> None:
    """Raise ValueError (naming the leaf's path) unless cond/uncond follow the module's rules."""
    for name, tree in (("cond", cond), ("uncond", uncond)):
        if tree is not None and not isinstance(tree, dict):
            raise ValueError(f"{name} must be a dict of model keyword arguments, got {type(tree).__name__}")
        _check_batched(tree, name, batch)
    if uncond is not None:
        _check_same(cond or {}, uncond, "cond")


def batched(cond, uncond, cfg: bool, device) -> dict:
    """The model's keyword arguments: cond's leaves on `device`, [uncond; cond] with guidance."""
    cond = cond or {}
    if not cfg:
        return map_tensors(lambda v: v.to(device), cond)
    return zip_tensors(lambda c, u: torch.cat([u.to(device), c.to(device)]), cond, uncond)


def signature(tree) -> tuple:
    """A hashable key: structure, tensor shapes and dtypes, non-tensor values (see the module)."""
    key = []
    for path, leaf in leaves(tree):
        if torch.is_tensor(leaf):
            key.append((path, tuple(leaf.shape), leaf.dtype))
        else:
            try:
                hash(leaf)
                key.append((path, type(leaf), leaf))
            except TypeError:
                key.append((path, type(leaf), repr(leaf)))
    return tuple(key)


def copy_into(static, tree):
    """Copy tree's tensors into `static` (same signature) and return it, or, when `static` is
    None or of another signature, return a fresh copy of tree for the static buffers."""
    if static is None or signature(static) != signature(tree):
        return map_tensors(lambda v: v.clone(), tree)
    zip_tensors(lambda s, v: s.copy_(v), static, tree)
    return static
