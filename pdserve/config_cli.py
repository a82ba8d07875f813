"""The CLI generated from the config tree (``pdserve/config.py``): one flag per leaf field, the
seed's refused flags beside them, and configs built back from parsed flags. Nothing here names a
particular config; ``pdserve.config`` re-exports these functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from pdserve.seed_flags import add_refusals, aliases_of

T = TypeVar("T")


def _base_type(tp: Any) -> type:
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # annotations are strings under `from __future__ import annotations`
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: set[str] = frozenset()) -> None:
    """Add one flag per leaf field of the config dataclass ``cls`` (recursing into sub-configs), and
    (once per parser) the seed's flags pdserve refuses, each with its reason (``seed_flags``)."""
    from pdserve.config import flag_name

    add_refusals(parser, accepted_flags())
    for f, tp in _resolved_fields(cls):
        if _is_config(tp):
            add_config_args(parser, tp, skip=skip)
            continue
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        name, help_text = flag_name(f), f.metadata.get("help", "")
        names = [name, *aliases_of(name)]   # the seed's other spelling too (--tp-size for --tp)
        base = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if base is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        choices = f.metadata.get("choices")
        if choices:
            choices = [c for c in choices if c is not None]
        parser.add_argument(*names, dest=f.name, type=base, choices=choices, default=argparse.SUPPRESS,
                            metavar=None if choices else base.__name__.upper(),
                            help=f"{help_text} (default: {default})")


def accepted_flags() -> set[str]:
    """Every flag some config dataclass of ``pdserve.config`` defines (and their seed aliases)."""
    from pdserve import config
    from pdserve.config import flag_name

    configs = [obj for obj in vars(config).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)]
    flags = {flag_name(f) for cls in configs for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    return flags | {alias for flag in flags for alias in aliases_of(flag)}


def config_from_args(cls: type[T], args: argparse.Namespace | dict, **overrides: Any) -> T:
    """Build ``cls`` from parsed args (only flags the user gave override defaults)."""
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    values.update(overrides)
    return _build(cls, values)


def _build(cls: type[T], values: dict) -> T:
    kwargs = {}
    for f, tp in _resolved_fields(cls):
        if _is_config(tp):
            kwargs[f.name] = _build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _leaf_fields(cls: type) -> list[dataclasses.Field]:
    out = []
    for f, tp in _resolved_fields(cls):
        out.extend(_leaf_fields(tp) if _is_config(tp) else [f])
    return out
