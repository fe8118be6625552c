"""The one parser of ``NAME[:key=value,...]`` specs: samplers, caches and parallel strategies.

``split_spec`` gives the name and the raw option strings; ``parse_spec`` types each value by its
look (true/false, whole number, number, else text: for registries of classes that take keyword
arguments, the samplers); ``parse_config`` types each value like the default of the config
dataclass field it sets (the caches' and the strategies' configs) and builds the config.
"""

from __future__ import annotations

import dataclasses


def split_spec(spec: str, label: str | None = None) -> tuple[str, dict[str, str]]:
    """(lower-case name, {key: raw value}) of ``NAME[:key=value,...]``; ``label`` names the thing
    in errors (default: the name itself)."""
    name, _, opts = spec.partition(":")
    name = name.strip().lower()
    options: dict[str, str] = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{label or name} option {item!r} must look like key=value")
        if key in options:
            raise ValueError(f"{label or name} option {key!r} is given twice in {spec!r}; give it once")
        options[key] = value.strip()
    return name, options


def guess_value(text: str):
    """``text`` as a bool (true / false), an int, a float, or else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str, label: str | None = None) -> tuple[str, dict]:
    """(name, {key: value}) of ``NAME[:key=value,...]``, each value typed by ``guess_value``."""
    name, options = split_spec(spec, label)
    return name, {key: guess_value(value) for key, value in options.items()}


def typed_value(text: str, like):
    """``text`` as the type of ``like`` (a default): bool, a number (an int where ``like`` is one and
    the value is whole, else a float, for the config to refuse with its own message), or text."""
    if isinstance(like, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    if isinstance(like, (int, float)):
        number = float(text)
        return int(number) if isinstance(like, int) and number == int(number) else number
    return text


def parse_config(spec: str, registry: dict, kind: str):
    """The config of ``NAME[:key=value,...]``, NAME a key of ``registry`` (name -> (config class,
    ...)); ``kind`` names what the registry holds in errors ("cache method", "parallel strategy")."""
    name, options = split_spec(spec)
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(registry))}")
    config_cls = registry[name][0]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    defaults = config_cls()
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            raise ValueError(f"{name} has no option {key!r}; its options: {', '.join(fields) or 'none'}")
        like = getattr(defaults, key)
        try:
            kwargs[key] = typed_value(value, like)
        except ValueError:
            raise ValueError(f"{name} option {key}={value!r} is not a {type(like).__name__}") from None
    return config_cls(**kwargs)
