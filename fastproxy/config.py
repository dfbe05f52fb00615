"""Environment variables and configuration files as layers under the command line.

The Auth Proxy (through viper) lets every flag come from three places; precedence is
flag > environment > config file > default, and so it is here:

* ``ALLOYDB_PROXY_<FLAG>`` (dashes become underscores, upper case), and ``FASTPROXY_<FLAG>``,
  which wins when both are set: fastproxy's own name for a setting beats the compatibility one.
  An empty variable counts as unset, as viper's does;
* a file named by ``--config-file`` (or its environment variable): ``.toml`` (tomllib),
  ``.yaml``/``.yml`` (PyYAML, the ``yaml`` extra) or ``.json``, with flag names as keys (case
  does not matter, as in viper; a key without a value, YAML ``key:`` or JSON ``null``, is unset).

On the command line a boolean flag also takes pflag's ``--flag=true`` / ``--flag=false`` (and
``-g=false``): Go's spelling for turning off a setting that the environment or a file turned on.

Instance URIs: the command line's, else ``ALLOYDB_PROXY_INSTANCE_URI`` or ``…_INSTANCE_URI_0``,
``_1``, … (stopping at the first gap), else the file's ``instance-uri`` / ``instance-uri-N``.

Everything here is pure (no I/O beyond reading the named file): the layers become argparse
defaults, so the parser stays the single source of truth for names, types and help.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastproxy.errors import ConfigError

ENV_PREFIXES = ("ALLOYDB_PROXY_", "FASTPROXY_")  # later entries win
INSTANCE_KEY = "instance-uri"
CONFIG_FILE_FLAG = "config-file"
_TRUE = frozenset({"1", "t", "true", "yes", "y", "on"})
_FALSE = frozenset({"0", "f", "false", "no", "n", "off"})
# Go's strconv.ParseBool, which pflag uses for ``--flag=value``.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# Flags that make no sense outside the command line.
_CLI_ONLY = frozenset({"help", "version"})


def env_names(flag: str) -> list[str]:
    """The environment variables for ``flag``, lowest precedence first."""
    suffix = flag.upper().replace("-", "_")
    return [prefix + suffix for prefix in ENV_PREFIXES]


def layered_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name (without ``--``) -> action, for every option a layer may set."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        longs = [s[2:] for s in action.option_strings if s.startswith("--")]
        if not longs or longs[0] in _CLI_ONLY:
            continue
        for name in longs:
            out[name] = action
    return out


def _as_bool(raw: object, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"invalid value for {where}: {str(raw)!r} (want true or false)")


def convert(action: argparse.Action, raw: object, where: str) -> Any:
    """``raw`` (a string from the environment, or a TOML/YAML/JSON value) as ``action`` stores it.

    ``where`` names the origin (``ALLOYDB_PROXY_PORT``, ``config file x.toml key 'port'``) so a
    bad value is reported against the place the user has to fix.
    """
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        value = _as_bool(raw, where)
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"invalid value for {where}: expected a single value")
    if isinstance(raw, bool):
        raw = "true" if raw else "false"
    text = str(raw)
    kind = action.type
    if kind is None:
        return text
    try:
        return kind(text)  # type: ignore[operator]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        name = getattr(kind, "__name__", "value")
        want = "an integer" if kind is int else name
        raise ConfigError(f"invalid value for {where}: {text!r} (want {want})") from exc


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file into a flat mapping."""
    ext = path.suffix.lower()
    if ext not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} should have extension of toml, yaml, or json")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        if ext == ".toml":
            data: object = tomllib.loads(text.decode())
        elif ext == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError as exc:
                raise ConfigError(
                    f"config file {path}: YAML needs PyYAML (pip install 'fastproxy[yaml]')"
                ) from exc
            data = yaml.safe_load(text) if text.strip() else {}
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error class; all mean "malformed"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"failed to load configuration from {path}: {first}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table/mapping of flag names")
    # viper's keys are case-insensitive; a key without a value (YAML ``key:``, JSON null) is unset.
    return {str(k).lower(): v for k, v in data.items() if v is not None}


def _numbered(get: Any, base: str) -> list[str]:
    """``base`` or ``base_0`` (``-0``), then ``_1``, ``_2``, … up to the first gap."""
    first = get(base, 0)
    if not first:
        return []
    out = [first]
    i = 1
    while (nxt := get(base, i)) is not None and nxt != "":
        out.append(nxt)
        i += 1
    return out


def instances_from_env(environ: Mapping[str, str]) -> list[str]:
    for prefix in reversed(ENV_PREFIXES):
        base = prefix + "INSTANCE_URI"

        def get(name: str, i: int) -> str | None:
            if i == 0:
                return environ.get(name) or environ.get(f"{name}_0")
            return environ.get(f"{name}_{i}")

        found = _numbered(get, base)
        if found:
            return found
    return []


def instances_from_file(data: Mapping[str, Any], path: Path) -> list[str]:
    def get(name: str, i: int) -> str | None:
        keys = [name, f"{name}-0"] if i == 0 else [f"{name}-{i}"]
        for key in keys:
            value = data.get(key)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise ConfigError(f"config file {path}: {key!r} must be a string")
            return value
        return None

    return _numbered(get, INSTANCE_KEY)


def _is_instance_key(key: str) -> bool:
    if key == INSTANCE_KEY:
        return True
    head, _, tail = key.rpartition("-")
    return head == INSTANCE_KEY and tail.isdigit()


def file_defaults(
    data: Mapping[str, Any], options: Mapping[str, argparse.Action], path: Path
) -> dict[str, Any]:
    """argparse ``dest`` -> value for every key of a config file; unknown keys are errors."""
    out: dict[str, Any] = {}
    for key, raw in data.items():
        if _is_instance_key(key):
            continue
        action = options.get(key)
        if action is None or key == CONFIG_FILE_FLAG:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        out[action.dest] = convert(action, raw, f"config file {path} key {key!r}")
    return out


def env_defaults(
    environ: Mapping[str, str], options: Mapping[str, argparse.Action]
) -> dict[str, Any]:
    """argparse ``dest`` -> value for every flag set in the environment.

    Per setting the last variable set (and not empty) wins, in this order: the ``ALLOYDB_PROXY_``
    names, then the ``FASTPROXY_`` ones, each with a flag's aliases before its first spelling.
    Only the winner is converted, so a bad value is reported against the variable that counts.
    """
    spellings: dict[str, tuple[argparse.Action, list[str]]] = {}
    for flag, action in options.items():
        spellings.setdefault(action.dest, (action, []))[1].append(flag)
    out: dict[str, Any] = {}
    for dest, (action, flags) in spellings.items():
        chosen: tuple[str, str] | None = None
        for index in range(len(ENV_PREFIXES)):
            for flag in reversed(flags):
                name = env_names(flag)[index]
                value = environ.get(name)
                if value:  # viper ignores an empty variable (AllowEmptyEnv is off)
                    chosen = (name, value)
        if chosen is not None:
            out[dest] = convert(action, chosen[1], chosen[0])
    return out


def bool_assignments(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[list[str], dict[str, bool]]:
    """pflag's ``--flag=VALUE`` for boolean flags, which argparse refuses.

    Returns ``argv`` with every ``--flag=true`` written as ``--flag`` and the flags whose last
    assignment is false removed, and those flags' ``dest`` -> False: set on the command line,
    they beat the environment and the config file. Everything after ``--`` is left alone.
    """
    flags = {
        option: action
        for action in parser._actions
        if isinstance(action, argparse._StoreTrueAction)
        for option in action.option_strings
    }
    kept: list[tuple[str, str | None]] = []
    last: dict[str, bool] = {}
    args = list(argv)
    for i, token in enumerate(args):
        if token == "--":
            kept.extend((rest, None) for rest in args[i:])
            break
        name, eq, raw = token.partition("=")
        action = flags.get(name)
        if action is None:
            kept.append((token, None))
            continue
        if not eq or raw in _GO_TRUE:
            last[action.dest] = True
        elif raw in _GO_FALSE:
            last[action.dest] = False
        else:
            raise ConfigError(f"invalid value for {name}: {raw!r} (want true or false)")
        kept.append((name, action.dest))
    off = {dest for dest, value in last.items() if not value}
    return [token for token, dest in kept if dest is None or dest not in off], dict.fromkeys(
        off, False
    )


def given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option the command line itself sets (not its defaults)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        ns = parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return {k for k in vars(ns) if k != "instances"}


def parse_layered(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str],
) -> tuple[argparse.Namespace, set[str]]:
    """Parse ``argv`` over the environment and config-file layers.

    Returns the namespace and the set of ``dest`` names set by any layer other than the defaults
    (the Auth Proxy's "the user has set this flag", used for conflicts like --unix-socket with
    --port).
    """
    argv, switched_off = bool_assignments(parser, argv)
    first = parser.parse_args(argv)  # command-line errors first, as the user typed them
    explicit = given_on_command_line(parser, argv) | set(switched_off)
    options = layered_options(parser)

    env = env_defaults(environ, options)
    config_path = first.config_file or env.get("config_file")
    file_layer: dict[str, Any] = {}
    file_instances: list[str] = []
    if config_path:
        path = Path(config_path)
        data = load_config_file(path)
        file_layer = file_defaults(data, options, path)
        file_instances = instances_from_file(data, path)

    layered = {**file_layer, **env, **switched_off}
    explicit |= set(layered)
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    parser.set_defaults(**layered)
    try:
        args = parser.parse_args(argv)
    finally:  # the parser's own defaults again, so it can be reused
        for action, default in saved:
            action.default = default
        parser._defaults.clear()
        parser._defaults.update(saved_defaults)
    if not args.instances:
        args.instances = instances_from_env(environ) or file_instances
    return args, explicit
