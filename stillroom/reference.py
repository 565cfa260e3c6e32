"""The references, generated from the code: every config key from the pydantic config types (its
type, default, allowed values and help: the field's docstring) and every CLI verb and flag from the
argument parser. The docs site renders them at build time (docs/hooks.py), so a new key or flag
appears there by itself; tests/test_docs.py checks that every key has its help."""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


@dataclass
class Key:
    key: str            # dotted, as on the command line (a list's items: peers.N.name)
    type: str
    default: str
    allowed: str        # Literal values, numeric bounds
    help: str
    section: str        # the command that reads it: distill (Config) or codistill (CodistillRunConfig)


def _model_of(annotation):
    """The config model a field holds (directly, optional, or a list of them), and whether a list."""
    args = typing.get_args(annotation)
    for a in (annotation, *args):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a, typing.get_origin(annotation) is list
    return None, False


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "choice"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]" if args else origin.__name__
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _allowed(field) -> str:
    ann = field.annotation
    for a in (ann, *typing.get_args(ann)):
        if typing.get_origin(a) is typing.Literal:
            return ", ".join(repr(v) if not isinstance(v, str) else v for v in typing.get_args(a))
    bounds = []
    for m in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, name, None)
            if v is not None:
                bounds.append(f"{sign} {v}")
    return ", ".join(bounds)


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            v = field.default_factory()
        except TypeError:
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        v = field.default
    if isinstance(v, BaseModel):
        return ""
    if isinstance(v, list) and v and isinstance(v[0], BaseModel):
        return f"{len(v)} entries"
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)


def config_keys(model=None, prefix: str = "", section: str = "distill") -> list[Key]:
    """Every leaf key of a config type, depth first in the order the type declares them."""
    from stillroom.config import CodistillRunConfig, Config

    if model is None:
        seen, out = set(), []
        for root, name in ((Config, "distill"), (CodistillRunConfig, "codistill")):
            for k in config_keys(root, "", name):
                if k.key not in seen:
                    seen.add(k.key)
                    out.append(k)
        return out
    out = []
    for name, field in model.model_fields.items():
        sub, many = _model_of(field.annotation)
        if sub is not None:
            out += config_keys(sub, f"{prefix}{name}.{'N.' if many else ''}", section)
        else:
            out.append(Key(f"{prefix}{name}", _type(field.annotation), _default(field), _allowed(field),
                           " ".join((field.description or "").split()), section))
    return out


def config_markdown() -> str:
    rows, last = [], None
    for k in config_keys():
        top = k.key.split(".")[0]
        if top != last:
            from stillroom.config import CodistillRunConfig, Config
            for root in (Config, CodistillRunConfig):
                f = root.model_fields.get(top)
                if f is not None:
                    break
            sub = _model_of(f.annotation)[0] if f is not None else None
            doc = " ".join(((sub.__doc__ if sub is not None else None) or (f.description if f else "") or "").split())
            rows.append(f"\n## `{top}`\n\n{doc}\n\n| key | type | default | allowed | what it does |\n"
                        "| --- | --- | --- | --- | --- |")
            last = top
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        rows.append(f"| `{k.key}` | {cell(k.type)} | `{cell(k.default)}` | {cell(k.allowed)} | {cell(k.help)}"
                    f"{' (codistill)' if k.section == 'codistill' else ''} |")
    return "\n".join(rows) + "\n"


def cli_markdown() -> str:
    from stillroom.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = []
    for name, p in sub.choices.items():
        out.append(f"\n## `stillroom {name}`\n\n{helps.get(name) or ''}\n")
        if p.description and p.description != helps.get(name):
            out.append(f"{p.description}\n")
        out.append(f"```\n{p.format_usage().strip()}\n```\n\n| argument | default | what it does |\n| --- | --- | --- |")
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            names = ", ".join(a.option_strings) or a.metavar or a.dest
            default = "" if a.default in (None, False, argparse.SUPPRESS) or a.option_strings == [] else f"`{a.default}`"
            what = (a.help or "") + (f" (one of: {', '.join(map(str, a.choices))})" if a.choices else "")
            out.append(f"| `{names}` | {default} | {what.replace('|', chr(92) + '|')} |")
    return "\n".join(out) + "\n"
