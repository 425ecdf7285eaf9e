"""Flags, environment and TOML into frozen config dataclasses, and configs to and from JSON.

A config field is a flag when its metadata says so (`pdmesh.option`); nothing else declares
flags. For one command, `collect` walks the config classes it builds and yields one `Flag` per
name (a flag may feed fields in several configs: `--model` reaches the scheduler and the
workers). A value comes from, in order of precedence: the command line, `PDMESH_<FLAG>` in the
environment, the `--config` TOML file (keys are flag names), the field's default.

Children of `pdmesh serve` (and tensor-parallel followers) receive their config whole as JSON
(`to_json` / `from_json`), never as a re-spelled argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pdmesh.errors import PdmeshError
from pdmesh.option import KEY, Option

ENV_PREFIX = "PDMESH_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(PdmeshError):
    """A flag, environment variable or config-file key with a bad name or value."""


@dataclass
class Flag:
    name: str  # without dashes: "kv-timeout"
    type: type  # int, float, str or bool
    optional: bool  # None is a valid value
    default: Any
    help: str = ""
    choices: tuple | None = None
    targets: list[tuple[str, ...]] = field(default_factory=list)  # (root, field, nested field, ...)

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def collect(roots: Mapping[str, type], skip: Mapping[str, set[str]] | None = None) -> dict[str, Flag]:
    """Every flag of the config classes in `roots` (name -> class), less `skip[root]` names."""
    flags: dict[str, Flag] = {}
    for root, cls in roots.items():
        _walk(cls, cls(), (root,), "", flags, (skip or {}).get(root, set()))
    return flags


def _walk(cls: type, defaults: Any, path: tuple[str, ...], prefix: str, flags: dict[str, Flag],
          skip: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        opt: Option | None = f.metadata.get(KEY)
        if opt is None:
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _walk(hints[f.name], default, (*path, f.name), prefix + opt.prefix, flags, skip)
            continue
        name = prefix + (opt.flag or f.name.replace("_", "-"))
        if name not in skip:
            _add(flags, name, hints[f.name], default, opt, prefix, (*path, f.name))


def _add(flags: dict[str, Flag], name: str, hint: Any, default: Any, opt: Option, prefix: str,
         target: tuple[str, ...]) -> None:
    base, optional = _base_type(hint)
    flag = flags.setdefault(name, Flag(name, base, optional, default, opt.help.format(role=prefix.rstrip("-")),
                                       opt.choices))
    if (flag.type, flag.default, flag.choices) != (base, default, opt.choices) or flag.help != opt.help.format(
            role=prefix.rstrip("-")):
        raise AssertionError(f"flag --{name} is declared twice, differently (second: {'.'.join(target)}); "
                             "give both fields the same option object")
    flag.targets.append(target)


def _base_type(hint: Any) -> tuple[type, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def add_flags(parser: argparse.ArgumentParser, flags: Mapping[str, Flag]) -> None:
    """Declare each flag on `parser`; unset flags stay absent (defaults are applied in `resolve`)."""
    for flag in flags.values():
        one_of = f"; one of {', '.join(map(str, flag.choices))}" if flag.choices else ""
        text = f"{flag.help} (default: {_show(flag.default)}{one_of}; env {flag.env})"
        kwargs: dict[str, Any] = {"dest": flag.dest, "default": argparse.SUPPRESS, "help": text}
        if flag.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=_parser_of(flag), choices=flag.choices, metavar=flag.dest.upper())
        parser.add_argument(f"--{flag.name}", **kwargs)


def _show(value: Any) -> str:
    return "unset" if value is None or value == "" else str(value)


def _parser_of(flag: Flag):
    def parse(text: str) -> Any:
        return convert(flag, text, f"--{flag.name}")
    parse.__name__ = flag.type.__name__  # argparse names the type in its error message
    return parse


def convert(flag: Flag, value: Any, source: str) -> Any:
    """`value` (a string from argv or the environment, or a TOML value) as the flag's type."""
    if flag.optional and (value is None or value == ""):
        return None
    try:
        if flag.type is bool:
            return _to_bool(value)
        if flag.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) or isinstance(value, flag.type) and not isinstance(value, bool):
            converted = flag.type(value)
        else:
            raise ValueError(f"expected {flag.type.__name__}")
    except ValueError as exc:
        raise ConfigError(f"{source}: {value!r} is not a valid {flag.type.__name__} ({exc})") from None
    if flag.choices and converted not in flag.choices:
        raise ConfigError(f"{source}: {converted!r} is not one of {', '.join(map(str, flag.choices))}")
    return converted


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ValueError(f"use one of {', '.join(TRUE + FALSE)}")


def resolve(flags: Mapping[str, Flag], namespace: argparse.Namespace, config_file: str | None = None,
            env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """flag name -> value for every flag set on the command line, in the environment or the file."""
    env = os.environ if env is None else env
    from_file = read_config_file(config_file, flags) if config_file else {}
    given = vars(namespace)
    values = {}
    for name, flag in flags.items():
        if flag.dest in given:
            values[name] = given[flag.dest]
        elif flag.env in env:
            values[name] = convert(flag, env[flag.env], f"${flag.env}")
        elif name in from_file:
            values[name] = convert(flag, from_file[name], f"{config_file}: {name}")
    return values


def read_config_file(path: str, flags: Mapping[str, Flag]) -> dict[str, Any]:
    """A TOML file of `flag-name = value` lines (underscores or dashes); unknown keys are errors."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    values = {key.replace("_", "-"): value for key, value in data.items()}
    unknown = sorted(set(values) - set(flags))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)} (see --help for the names)")
    return values


def build(cls: type, root: str, flags: Mapping[str, Flag], values: Mapping[str, Any], **fixed: Any) -> Any:
    """An instance of `cls` (the config named `root` in `collect`) from its defaults, the resolved
    `values` and `fixed` top-level fields; every dataclass validates itself on the way."""
    changes: dict[tuple[str, ...], Any] = {}
    for name, value in values.items():
        for target in flags[name].targets:
            if target[0] == root:
                changes[target[1:]] = value
    changes.update({(k,): v for k, v in fixed.items()})
    return _apply(cls(), changes)


def _apply(instance: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    direct = {path[0]: v for path, v in changes.items() if len(path) == 1}
    nested: dict[str, dict] = {}
    for path, value in changes.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, sub in nested.items():
        direct[name] = _apply(getattr(instance, name), sub)
    return dataclasses.replace(instance, **direct) if direct else instance


def to_json(config: Any) -> str:
    """A config dataclass (with nested ones) as JSON: how a parent hands a child its config."""
    return json.dumps(dataclasses.asdict(config))


def from_json(cls: type, text: str) -> Any:
    return _from_dict(cls, json.loads(text))


def _from_dict(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint, value = hints[f.name], data[f.name]
        base, _ = _base_type(hint)
        if dataclasses.is_dataclass(base) and value is not None:
            value = _from_dict(base, value)
        elif typing.get_origin(base) is tuple:
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)
