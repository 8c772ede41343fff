"""Nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) <-> JSON tree + flat tensors.

An optimizer's ``state_dict()`` has int keys, tuples and tensors; JSON has none of these. The tree
keeps the structure in plain JSON with small tagged objects, and moves every tensor into a flat
name -> tensor map that goes to a safetensors file. Decoding is the exact inverse and never
evaluates or unpickles anything: unknown tags are an error, not a guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


class TreeError(ValueError):
    """A value cannot be stored without pickle, or a stored tree is malformed."""


def encode(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Return a JSON-able tree for `value`; tensors are added to `tensors` under their tree path."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _add(tensors, path, value.detach())}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _add(tensors, path, torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.generic):
        return encode(value.item(), tensors, path)
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in value.items()}
        return {
            "__dict__": [
                [encode(k, tensors, f"{path}/key{i}"), encode(v, tensors, f"{path}/{k}")]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    raise TreeError(
        f"value at {path or '/'} has type {type(value).__name__}, which cannot be saved without pickle; "
        "convert it to tensors, numbers, strings, lists or dicts"
    )


def _add(tensors: dict[str, torch.Tensor], path: str, tensor: torch.Tensor) -> str:
    key = path or "/"
    while key in tensors:  # two paths that read alike ("a/b" vs nested a -> b)
        key += "'"
    tensors[key] = tensor
    return key


def decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`. A tree read from disk is untrusted: whatever is wrong with it is a TreeError."""
    try:
        return _decode(tree, tensors)
    except TreeError:
        raise
    except (TypeError, ValueError, RuntimeError, RecursionError) as exc:  # e.g. an "__ndarray__" of a bfloat16
        raise TreeError(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((tag, payload),) = tree.items()
        if tag == "__tensor__":
            return _tensor(tensors, payload)
        if tag == "__ndarray__":
            return _tensor(tensors, payload).numpy()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in _list(payload))
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in _pairs(payload)}
        if tag == "__float__":
            if payload not in ("nan", "inf", "-inf"):
                raise TreeError(f"invalid float tag {payload!r}")
            return float(payload)
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _tensor(tensors: Mapping[str, torch.Tensor], key: Any) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise TreeError(f"tree refers to tensor {key!r}, which the tensor file does not hold")
    return tensors[key]


def _list(payload: Any) -> list[Any]:
    if not isinstance(payload, list):
        raise TreeError("tagged payload is not a list")
    return payload


def _pairs(payload: Any) -> list[tuple[Any, Any]]:
    pairs = _list(payload)
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise TreeError("__dict__ payload is not a list of [key, value] pairs")
    return [(p[0], p[1]) for p in pairs]


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        raise TreeError(f"dict key {key!r} is not hashable") from None
    return key
