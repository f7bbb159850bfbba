"""Check a composed config before anything is built: unknown keys and wrong types, named by their full key.

Works on the plain nested dict of a resolved config. Every node with a `_target_` is checked against
the signature of what it builds: a key the target does not take, or a value of the wrong type for
the target's annotation, is an error that names the key (e.g. `model.widht`, `data.num_frames`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with its full key."""


def check_config(config: dict, supplied: dict[str, set[str]] | None = None) -> None:
    """Raise ConfigError for the first problem found. `supplied`: keys the caller passes at build time."""
    for path, node in _target_nodes(config, ""):
        _check_node(path, node, (supplied or {}).get(path, set()))


def _target_nodes(node: Any, path: str):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            if not key.startswith("_"):
                yield from _target_nodes(value, f"{path}.{key}" if path else key)


def resolve_target(path: str, target: str):
    module_name, _, attribute = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{path or '<root>'}._target_: cannot import {target!r} ({error})") from error


def _parameters(target) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    function = target.__init__ if inspect.isclass(target) else target
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # annotations that do not resolve: check names only
        hints = {}
    if dataclasses.is_dataclass(target):
        init_fields = {f.name for f in dataclasses.fields(target) if f.init}
        params = {name: p for name, p in signature.parameters.items() if name in init_fields}
    else:
        params = dict(signature.parameters)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {n: p for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return params, hints, takes_any


def _check_node(path: str, node: dict, supplied: set[str]) -> None:
    target = resolve_target(path, node["_target_"])
    params, hints, takes_any = _parameters(target)
    given = {k: v for k, v in node.items() if not k.startswith("_")}
    for key, value in given.items():
        full_key = f"{path}.{key}" if path else key
        if key not in params:
            if takes_any:
                continue
            raise ConfigError(f"{full_key}: unknown key for {node['_target_']} (valid keys: {', '.join(params)})")
        if key in hints and not (isinstance(value, dict) and "_target_" in value) and not _matches(value, hints[key]):
            raise ConfigError(f"{full_key}: expected {_type_name(hints[key])}, got {value!r}")
    if node.get("_partial_"):
        return
    missing = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty and name not in given and name not in supplied
    ]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: required by {node['_target_']} but not set")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain config value fits a type annotation. Unknown annotations accept anything."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(hint) and len(args) != len(value):
            return False
        return all(any(_matches(item, a) for a in args) for item in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
