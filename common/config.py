"""Typed daemon configuration from TOML with environment overrides.

Each daemon has one frozen dataclass tree (see ``aggregator.config`` and
``clinic_agent.config``). :func:`load_config` fills it from a TOML file, then applies
``<PREFIX>__SECTION__KEY=value`` environment overrides (double underscores, because keys
themselves contain single ones), then runs each section's ``validate()``. Every problem is
reported as a :class:`ConfigError` naming the dotted key, e.g. ``rounds.min_clinics``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, base: Path | None) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting env strings)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key, base)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        items = [_coerce(v, item_tp, f"{key}[{i}]", base) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        path = Path(value).expanduser()
        if base is not None and not path.is_absolute() and str(value) != "":
            path = base / path
        return path
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key, base)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: Any, data: Mapping[str, Any], prefix: str, base: Path | None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, fld in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], where, base)
        elif required and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, where, base)
        elif required:
            raise ConfigError(f"{where}: required key is missing")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc
    return obj


def _apply_env(data: dict[str, Any], env: Mapping[str, str], prefix: str) -> None:
    marker = prefix + "__"
    for name, value in env.items():
        if not name.startswith(marker):
            continue
        path = [p.lower() for p in name[len(marker) :].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {name} overrides a non-table value")
            node = child
        node[path[-1]] = value


def _validate_tree(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{prefix}.{f.name}" if prefix else f.name)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def load_config(
    cls: type[T],
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "DERMAFED",
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Load ``cls`` from a TOML file (relative paths resolve against its folder)."""
    data: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        base = Path(path).resolve().parent
    _apply_env(data, os.environ if env is None else env, env_prefix)
    if overrides:
        _merge(data, overrides)
    obj = _build(cls, data, "", base)
    _validate_tree(obj)
    return typing.cast(T, obj)


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = dict(value) if isinstance(value, Mapping) else value


def require(condition: bool, key: str, message: str) -> None:
    """Raise a :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port must be a number, got {port!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{key}: port {number} out of range")
    return host.strip("[]"), number


@dataclasses.dataclass(frozen=True)
class MetricsSection:
    listen: str = ""  # "HOST:PORT" serves /metrics; empty disables

    def validate(self) -> None:
        if self.listen:
            parse_hostport(self.listen, "metrics.listen")


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    level: str = "INFO"
    json: bool = False

    def validate(self) -> None:
        require(
            self.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "logging.level",
            "must be DEBUG, INFO, WARNING or ERROR",
        )


@dataclasses.dataclass(frozen=True)
class AggregatorSection:
    """Where a client (clinic agent, admin CLI) reaches the aggregator."""

    address: str
    # TLS name to verify in the aggregator's certificate when it differs from the host.
    server_name: str = ""

    def validate(self) -> None:
        parse_hostport(self.address, "aggregator.address")


@dataclasses.dataclass(frozen=True)
class TlsSection:
    """A client's mutual-TLS material: the federation CA and its own certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path

    def validate(self) -> None:
        for name in ("ca_cert", "cert", "key"):
            path = getattr(self, name)
            require(path.is_file(), f"tls.{name}", f"file {path} does not exist")
