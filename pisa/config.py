"""Experiment configs: YAML files with at most one base, ``--set`` overrides, and a schema.

A config is plain nested data (dicts, lists, scalars). :func:`load_config` reads a file, merges it over
the one base file it may name (``base:``, relative to the file), applies ``--set`` overrides, validates
the result against :data:`SCHEMA` and fills in defaults, so downstream code can index
``cfg["optim"]["lr"]`` without ``.get``.

Merge rules, the same for a child file and for ``--set``: mappings merge key by key; lists, scalars and
``null`` replace. One exception: a mapping whose ``type`` picks another schema variant (``model.type``,
``data.train.type``, ``data.val.type``) replaces the base mapping, because the base's keys belong to a
different component.

Relative paths inside a config (data files, weights) are used as written, i.e. relative to the current
directory, like any path on a command line. Only ``base:`` is relative to the config file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import re
import sys
import tempfile
from typing import Any, Iterable, Sequence

import yaml

from pisa.config_schema import (REQUIRED, SCHEMA, ConfigError, Key, Section, Spec,  # noqa: F401
                                 Variants)

__all__ = ["ConfigError", "Key", "Section", "Variants", "SCHEMA", "load_config", "validate", "merge",
           "apply_overrides", "dump", "save", "add_config_args"]




# --------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2); plain PyYAML reads it as a string."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None


def _read_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    data = _parse_yaml(text, f"config file '{path}'")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {_describe(data)}")
    return data


class _Dumper(yaml.SafeDumper):
    """Block-style mappings; lists of scalars (or of scalar lists) on one line, as written by hand."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(
        isinstance(x, (dict, list)) for x in v)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def dump(cfg: dict) -> str:
    """The config as YAML text, keys in their given order; ``load_config`` reads it back unchanged."""
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def save(cfg: dict, work_dir: str) -> str:
    """Write ``work_dir/config.yaml`` atomically (temp file, fsync, rename); returns its path."""
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, "config.yaml")
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".config.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# --------------------------------------------------------------------------- merge and overrides

def _variant_paths(spec: Spec, prefix: str = "") -> set[str]:
    """Dotted paths of every ``Variants`` mapping in ``spec``."""
    found = set()
    if isinstance(spec, Variants):
        found.add(prefix)
    sections = spec.options.values() if isinstance(spec, Variants) else [spec]
    for section in sections:
        if isinstance(section, Section):
            for name, child in section.keys.items():
                found |= _variant_paths(child, f"{prefix}.{name}" if prefix else name)
    return found


_VARIANT_PATHS = _variant_paths(SCHEMA)


def merge(base: dict, child: dict, _prefix: str = "") -> dict:
    """Deep merge of ``child`` over ``base`` (a new dict; inputs untouched).

    Mappings merge key by key; anything else in ``child`` (lists, scalars, null) replaces. A mapping
    at a variant path (``model``, ``data.train``, ``data.val``) whose ``type`` differs replaces.
    """
    out = copy.deepcopy(base)
    for name, value in child.items():
        path = f"{_prefix}.{name}" if _prefix else name
        old = out.get(name)
        switches = (path in _VARIANT_PATHS and isinstance(value, dict) and isinstance(old, dict)
                    and "type" in value and value["type"] != old.get("type"))
        if isinstance(old, dict) and isinstance(value, dict) and not switches:
            out[name] = merge(old, value, path)
        else:
            out[name] = copy.deepcopy(value)
    return out


_KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=VALUE"`` -> (["a", "b"], VALUE parsed as YAML)."""
    path, sep, text = item.partition("=")
    path = path.strip()
    if not sep or not _KEY_PATH.match(path):
        raise ConfigError(f"--set expects KEY.PATH=VALUE items (e.g. optim.lr=0.02), got '{item}'; "
                          "put positional arguments before --set (or end its items with --)")
    if not text.strip():
        raise ConfigError(f"--set {item}: no value; write '{path}=null' to clear the key")
    return path.split("."), _parse_yaml(text, f"--set {item}: the value")


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``--set key.path=value`` items in order; each acts like a child file ``{key: {path: value}}``.

    An unknown key path raises the same suggestion error as validation, naming the ``--set`` item.
    """
    for item in overrides:
        names, value = _parse_override(item)
        nested = value
        for name in reversed(names):
            nested = {name: nested}
        cfg = merge(cfg, nested)
        _check_known_path(cfg, names, f"--set {item}: ")
    return cfg


def _check_known_path(cfg: dict, names: list[str], context: str) -> None:
    """Raise if ``names`` is not a key path of the schema (variants resolved through ``cfg``)."""
    spec: Spec = SCHEMA
    node: Any = cfg
    for depth, name in enumerate(names):
        prefix = ".".join(names[:depth])
        if isinstance(spec, Key):
            raise ConfigError(f"{context}config key '{prefix}' is a single value, not a mapping")
        if isinstance(spec, Variants):
            kind = node.get("type") if isinstance(node, dict) else None
            option = spec.options.get(kind) if isinstance(kind, str) else None
            if option is None:
                return  # invalid or missing type: validation reports it with the valid names
            keys = {"type": Key(("str",)), **option.keys}
        else:
            keys = spec.keys
        if name not in keys:
            raise ConfigError(context + _unknown_key_message(prefix, name, keys))
        spec = keys[name]
        node = node.get(name) if isinstance(node, dict) else None


# --------------------------------------------------------------------------- validation

_TYPE_WORDS = {"null": "null", "bool": "true or false", "int": "an integer", "float": "a number",
               "str": "a string", "list": "a list", "dict": "a mapping"}


def _describe(value: Any) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list",
            dict: "dict", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({_TYPE_WORDS.get(kind, kind)})"


def _has_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "float"):
        allowed = int if kind == "int" else (int, float)
        return isinstance(value, allowed) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "list": (list, tuple)}[kind])


def _all_key_paths(spec: Spec, prefix: str = "") -> list[str]:
    """Every dotted key path in ``spec`` (variants flattened), in schema order."""
    sections = spec.options.values() if isinstance(spec, Variants) else [spec]
    paths: list[str] = [prefix] if prefix else []
    if isinstance(spec, Variants):
        paths.append(f"{prefix}.type")
    for section in sections:
        if isinstance(section, Section):
            for name, child in section.keys.items():
                paths += [p for p in _all_key_paths(child, f"{prefix}.{name}" if prefix else name)
                          if p not in paths]
    return paths


_ALL_PATHS = _all_key_paths(SCHEMA)


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    """Best guess of what a misspelled key meant: close spelling, else a shared ``_`` word or prefix."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    words = set(name.lower().split("_"))
    related = [c for c in candidates if words & set(c.split("_"))
               or (len(c) >= 2 and name.lower().startswith(c)) or (len(name) >= 2 and c.startswith(name))]
    return max(related, key=lambda c: difflib.SequenceMatcher(None, name, c).ratio()) if related else None


def _unknown_key_message(prefix: str, name: str, keys: Iterable[str]) -> str:
    full = f"{prefix}.{name}" if prefix else name
    keys = list(keys)
    guess = _closest(name, keys)
    if guess is None:  # the key may belong to another section, e.g. 'model.lr' for 'optim.lr'
        elsewhere = [p for p in _ALL_PATHS if p.rsplit(".", 1)[-1] == name]
        if len(elsewhere) == 1:
            return f"config key '{full}' is not known; did you mean '{elsewhere[0]}'?"
        where = f"under '{prefix}'" if prefix else "at the top level"
        return f"config key '{full}' is not known; valid keys {where}: {', '.join(keys)}"
    return f"config key '{full}' is not known; did you mean '{f'{prefix}.{guess}' if prefix else guess}'?"


@dataclasses.dataclass
class _Context:
    check_paths: bool | tuple[str, ...]

    def checks(self, path: str) -> bool:
        if isinstance(self.check_paths, bool):
            return self.check_paths
        return any(path == p or path.startswith(p + ".") for p in self.check_paths)


def _check_key(key: Key, value: Any, path: str, ctx: _Context) -> Any:
    """Type, range, choice and file checks of one value; returns it normalised (ints -> floats)."""
    kinds = [k for k in key.types if _has_type(value, k)]
    if not kinds:
        expected = " or ".join(_TYPE_WORDS[k] for k in key.types)
        raise ConfigError(f"config key '{path}' must be {expected}, got {_describe(value)}")
    if kinds[0] == "float" and "int" not in kinds:
        value = float(value)
    if kinds[0] in ("int", "float"):
        _check_range(key, value, path)
    if isinstance(value, str) and key.choices and value not in key.choices:
        valid = (["null"] if "null" in key.types else []) + list(key.choices)
        hint = _closest(value, key.choices)
        raise ConfigError(f"config key '{path}' is '{value}'; valid values: {', '.join(valid)}"
                          + (f" (did you mean '{hint}'?)" if hint else ""))
    if isinstance(value, str) and key.path and value not in key.keywords and ctx.checks(path):
        _check_exists(key.path, value, path)
    if kinds[0] == "list":
        value = _check_list(key, list(value), path, ctx)
    return value


def _check_range(key: Key, value: float, path: str) -> None:
    low_bad = key.min is not None and (value <= key.min if key.exclusive else value < key.min)
    high_bad = key.max is not None and (value >= key.max if key.exclusive else value > key.max)
    if low_bad or high_bad:
        lo = "" if key.min is None else (f"> {key.min}" if key.exclusive else f">= {key.min}")
        hi = "" if key.max is None else (f"< {key.max}" if key.exclusive else f"<= {key.max}")
        raise ConfigError(f"config key '{path}' must be {' and '.join(s for s in (lo, hi) if s)}, "
                          f"got {value!r}")


def _check_list(key: Key, value: list, path: str, ctx: _Context) -> list:
    if key.length is not None and len(value) != key.length:
        raise ConfigError(f"config key '{path}' must be a list of {key.length} items, got {value!r}")
    if len(value) < key.min_len:
        raise ConfigError(f"config key '{path}' must be a list of at least {key.min_len} item(s), "
                          f"got {value!r}")
    if key.items is None:
        return value
    return [_check_key(key.items, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]


def _check_exists(kind: str, value: str, path: str) -> None:
    ok = os.path.isfile(value) if kind == "file" else os.path.isdir(value)
    if not ok and os.path.exists(value):
        other = "a directory" if kind == "file" else "a file"
        raise ConfigError(f"config key '{path}': '{value}' is {other}, not a {kind}; "
                          f"fix the path or pass --set {path}=PATH")
    if not ok:
        where = "" if os.path.isabs(value) else \
            f" (relative paths are taken from the current directory, {os.getcwd()})"
        raise ConfigError(f"config key '{path}': {kind} '{value}' does not exist{where}; "
                          f"fix the path or pass --set {path}=PATH")


def _check_section(section: Section, value: Any, path: str, ctx: _Context) -> dict | None:
    if value is None and section.optional:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' must be a mapping, got {_describe(value)}")
    for name in value:
        if name not in section.keys:
            raise ConfigError(_unknown_key_message(path, str(name), section.keys))
    out = {}
    for name, spec in section.keys.items():
        child_path = f"{path}.{name}" if path else name
        if name in value:
            out[name] = _check(spec, value[name], child_path, ctx)
        else:
            out[name] = _default(spec, child_path, ctx)
    return out


def _check_variants(spec: Variants, value: Any, path: str, ctx: _Context) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' must be a mapping with a 'type', got {_describe(value)}")
    names = ", ".join(spec.options)
    if "type" not in value:
        raise ConfigError(f"config key '{path}.type' is required; valid names: {names}")
    kind = value["type"]
    if not isinstance(kind, str) or kind not in spec.options:
        hint = _closest(str(kind), list(spec.options))
        raise ConfigError(f"config key '{path}.type' is {kind!r}, which is not known; valid names: {names}"
                          + (f" (did you mean '{hint}'?)" if hint else ""))
    rest = {k: v for k, v in value.items() if k != "type"}
    return {"type": kind, **_check_section(spec.options[kind], rest, path, ctx)}


def _check(spec: Spec, value: Any, path: str, ctx: _Context) -> Any:
    if isinstance(spec, Key):
        return _check_key(spec, value, path, ctx)
    if isinstance(spec, Section):
        return _check_section(spec, value, path, ctx)
    return _check_variants(spec, value, path, ctx)


def _default(spec: Spec, path: str, ctx: _Context) -> Any:
    """Value of an absent key: its default, a filled section, null for optional sections, or an error."""
    if isinstance(spec, Key):
        if spec.default is REQUIRED:
            raise ConfigError(f"config key '{path}' is required but missing ({spec.doc})")
        return copy.deepcopy(spec.default)
    if isinstance(spec, Section) and spec.optional:
        return None
    if isinstance(spec, Variants):
        raise ConfigError(f"config key '{path}' is required but missing; give '{path}.type' "
                          f"(one of {', '.join(spec.options)}) and its keys")
    return _check_section(spec, {}, path, ctx)


def _check_consistency(cfg: dict) -> None:
    """Checks that involve several keys."""
    steps = cfg["schedule"]["steps"]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"config key 'schedule.steps' must be increasing epoch numbers, got {steps}")


def validate(cfg: dict, check_paths: bool | Sequence[str] = True) -> dict:
    """Check a resolved config against ``SCHEMA``; returns a new dict with every default filled in.

    ``check_paths``: True checks that every data file, weight file and directory exists; False checks
    none; a sequence of key prefixes (e.g. ``["data.val", "load_from"]``) checks only those.
    Raises ConfigError naming the first bad key.
    """
    if cfg.get("base") is not None:
        raise ConfigError("config key 'base' is still set: merge it with load_config before validate")
    ctx = _Context(check_paths if isinstance(check_paths, bool) else tuple(check_paths))
    out = _check_section(SCHEMA, cfg, "", ctx)
    out.pop("base")  # consumed by load_config: a resolved config stands alone
    _check_consistency(out)
    return out


def load_config(path: str, overrides: Sequence[str] | None = (),
                check_paths: bool | Sequence[str] = True) -> dict:
    """Load ``path``, merge it over its base, apply ``--set`` overrides, validate and fill defaults."""
    cfg = _read_file(path)
    base = cfg.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file '{path}': 'base' must be a file name, got {_describe(base)}")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"config file '{path}' names base '{base}', which does not exist ({base_path})")
        base_cfg = _read_file(base_path)
        if base_cfg.pop("base", None) is not None:
            raise ConfigError(f"config file '{path}' names base '{base}', which names another base; "
                              f"only one level is allowed: fold the two bases into one file")
        cfg = merge(base_cfg, cfg)
    cfg = apply_overrides(cfg, overrides or ())
    return validate(cfg, check_paths)


# --------------------------------------------------------------------------- command line

def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--set KEY=VALUE`` option (collected in ``args.overrides``)."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys; each VALUE is YAML, e.g. --set optim.lr=0.02 pisa=null "
                             "'data.train_transforms.scales=[[640,640]]' (one or several items per --set; "
                             "repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pisa.config CONFIG [--set k=v ...]``: print the resolved config as YAML."""
    parser = argparse.ArgumentParser(prog="python -m pisa.config", description=main.__doc__)
    parser.add_argument("config", help="experiment YAML file")
    add_config_args(parser)
    parser.add_argument("--no-check-paths", action="store_true",
                        help="do not require data and weight files to exist")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, check_paths=not args.no_check_paths)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(dump(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
