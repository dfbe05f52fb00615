"""Environment variables and config files as layers under the command line (fastproxy.config).

Every flag is covered three times, generated from the parser so a new flag is covered the day it
is added: as ``ALLOYDB_PROXY_<FLAG>`` and ``FASTPROXY_<FLAG>``, as a key of a TOML, YAML and JSON
config file, and through the whole precedence chain (flag > environment > file > default).
Everything is pure: the environment is a dict, files live in ``tmp_path``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from fastproxy.__main__ import build_parser
from fastproxy.config import (
    CONFIG_FILE_FLAG,
    env_names,
    layered_options,
    load_config_file,
    parse_layered,
)
from fastproxy.errors import ConfigError

U = "projects/proj/locations/region/clusters/clust/instances/inst"
ALT = "projects/proj/locations/region/clusters/clust2/instances/inst2"

OPTIONS = layered_options(build_parser())  # every long flag (aliases too) but help/version
FLAGS = sorted(OPTIONS)
FILE_FLAGS = [f for f in FLAGS if f != CONFIG_FILE_FLAG]  # a file cannot name another file
# Realistic strings where the flag has a shape; parse_layered itself checks only types.
SAMPLES = {
    "address": "0.0.0.0",
    "http-address": "0.0.0.0",
    "alloydbadmin-api-endpoint": "https://test.googleapis.com",
    "dial-timeout": "1m30s",
    "min-sigterm-delay": "10s",
    "max-sigterm-delay": "10s",
    "impersonate-service-account": "sv1@developer.gserviceaccount.com",
    "json-credentials": '{"json":"goes-here"}',
    "user-agent": "some-runtime/0.0.1",
}


def kind(flag: str) -> type:
    action = OPTIONS[flag]
    if isinstance(action, argparse._StoreTrueAction):
        return bool
    return int if action.type is int else str


def sample(flag: str, n: int = 0) -> Any:
    """The n-th distinct sample value of ``flag`` as the namespace holds it."""
    k = kind(flag)
    if k is bool:
        return n % 2 == 0  # alternates, so every layer changes the value
    if k is int:
        return 7 + n
    base = SAMPLES.get(flag, f"{flag}-value")
    return base if n == 0 else f"{base}-{n}"


def as_env(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse(
    argv: list[str], environ: dict[str, str] | None = None
) -> tuple[argparse.Namespace, set[str]]:
    return parse_layered(build_parser(), argv, environ or {})


def write_config(tmp_path: Path, ext: str, data: dict[str, Any], name: str = "proxy") -> Path:
    path = tmp_path / f"{name}{ext}"
    if ext == ".json":
        path.write_text(json.dumps(data))
    elif ext == ".toml":
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items()))
    else:  # YAML: JSON scalars are YAML scalars
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in data.items()))
    return path


def dest(flag: str) -> str:
    return OPTIONS[flag].dest


def test_generated_cases_cover_every_flag() -> None:
    assert len(FLAGS) >= 45
    assert {"exit-zero-sigterm", "exit-zero-on-sigterm", "config-file", "port"} <= set(FLAGS)
    assert not {"help", "version"} & set(FLAGS)


# --- one environment variable per flag ------------------------------------------------------


@pytest.mark.parametrize("prefix", ["ALLOYDB_PROXY_", "FASTPROXY_"])
@pytest.mark.parametrize("flag", FLAGS)
def test_environment_variable(flag: str, prefix: str, tmp_path: Path) -> None:
    name = prefix + flag.upper().replace("-", "_")
    assert name in env_names(flag)
    if flag == CONFIG_FILE_FLAG:
        want: Any = str(write_config(tmp_path, ".toml", {}))
    else:
        want = sample(flag)
    args, explicit = parse([U], {name: as_env(want)})
    assert getattr(args, dest(flag)) == want
    assert dest(flag) in explicit  # "set by the user", e.g. for --unix-socket with --port
    default = parse([U])[0]
    others = {k: v for k, v in vars(args).items() if k != dest(flag)}
    assert others == {k: v for k, v in vars(default).items() if k != dest(flag)}


# --- one config-file key per flag, in each format -------------------------------------------


@pytest.mark.parametrize("ext", [".toml", ".yaml", ".json"])
@pytest.mark.parametrize("flag", FILE_FLAGS)
def test_config_file_key(flag: str, ext: str, tmp_path: Path) -> None:
    want = sample(flag)
    path = write_config(tmp_path, ext, {flag: want})
    args, explicit = parse(["--config-file", str(path), U])
    assert getattr(args, dest(flag)) == want
    assert dest(flag) in explicit


# --- precedence, per flag: flag > FASTPROXY_ > ALLOYDB_PROXY_ > file > default --------------


def cli_tokens(flag: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [f"--{flag}={str(value).lower()}"]
    return [f"--{flag}", str(value)]


@pytest.mark.parametrize("flag", FILE_FLAGS)
def test_precedence(flag: str, tmp_path: Path) -> None:
    file_value, env_value, fp_value, cli_value = (sample(flag, n) for n in range(4))
    alloydb_name, fastproxy_name = env_names(flag)
    cfg = ["--config-file", str(write_config(tmp_path, ".json", {flag: file_value}))]
    env = {alloydb_name: as_env(env_value)}
    both = {**env, fastproxy_name: as_env(fp_value)}
    default = OPTIONS[flag].default

    assert getattr(parse([U])[0], dest(flag)) == default
    assert getattr(parse([*cfg, U])[0], dest(flag)) == file_value
    assert getattr(parse([*cfg, U], env)[0], dest(flag)) == env_value
    assert getattr(parse([*cfg, U], both)[0], dest(flag)) == fp_value
    assert getattr(parse([*cfg, *cli_tokens(flag, cli_value), U], both)[0], dest(flag)) == (
        cli_value
    )


# --- instance URIs from the environment and the file ----------------------------------------


@pytest.mark.parametrize(
    ("env", "argv", "want"),
    [
        ({"ALLOYDB_PROXY_INSTANCE_URI": U}, [], [U]),
        ({"ALLOYDB_PROXY_INSTANCE_URI_0": U}, [], [U]),
        (
            {
                "ALLOYDB_PROXY_INSTANCE_URI_0": U + "0",
                "ALLOYDB_PROXY_INSTANCE_URI_1": U + "1",
                "ALLOYDB_PROXY_INSTANCE_URI_2": U + "2",
            },
            [],
            [U + "0", U + "1", U + "2"],
        ),
        (
            {"ALLOYDB_PROXY_INSTANCE_URI_0": U + "0", "ALLOYDB_PROXY_INSTANCE_URI_2": U + "2"},
            [],
            [U + "0"],
        ),
        ({"ALLOYDB_PROXY_INSTANCE_URI_1": U + "1"}, [], []),
        (
            {"ALLOYDB_PROXY_INSTANCE_URI": U, "ALLOYDB_PROXY_INSTANCE_URI_1": ALT},
            [],
            [U, ALT],
        ),
        ({"ALLOYDB_PROXY_INSTANCE_URI": U}, [ALT], [ALT]),
        ({"ALLOYDB_PROXY_INSTANCE_URI": U, "FASTPROXY_INSTANCE_URI": ALT}, [], [ALT]),
        ({"ALLOYDB_PROXY_INSTANCE_URI": ""}, [], []),
        ({"ALLOYDB_PROXY_INSTANCE_URI": f"{U}?port=6000"}, [], [f"{U}?port=6000"]),
    ],
    ids=[
        "single",
        "only-index-0",
        "indexed",
        "stops-at-first-gap",
        "no-index-0",
        "unindexed-then-1",
        "command-line-wins",
        "fastproxy-prefix-wins",
        "empty-is-unset",
        "with-query",
    ],
)
def test_instances_from_environment(env: dict[str, str], argv: list[str], want: list[str]) -> None:
    assert parse(argv, env)[0].instances == want


@pytest.mark.parametrize("ext", [".toml", ".yaml", ".yml", ".json"])
@pytest.mark.parametrize(
    ("data", "want"),
    [
        ({"instance-uri": U}, [U]),
        ({"instance-uri-0": U, "instance-uri-1": ALT}, [U, ALT]),
        ({"instance-uri-0": U, "instance-uri-2": ALT}, [U]),
        ({"instance-uri": U, "instance-uri-1": ALT, "instance-uri-2": U + "3"}, [U, ALT, U + "3"]),
        ({"instance-uri-1": ALT}, []),
    ],
    ids=["single", "two", "gap", "three", "no-first"],
)
def test_instances_from_file(
    tmp_path: Path, ext: str, data: dict[str, str], want: list[str]
) -> None:
    path = write_config(tmp_path, ext, data)
    assert parse(["--config-file", str(path)])[0].instances == want


def test_instance_precedence_command_line_then_environment_then_file(tmp_path: Path) -> None:
    path = str(write_config(tmp_path, ".toml", {"instance-uri": U}))
    env = {"ALLOYDB_PROXY_INSTANCE_URI": ALT}
    assert parse(["--config-file", path])[0].instances == [U]
    assert parse(["--config-file", path], env)[0].instances == [ALT]
    assert parse(["--config-file", path, U + "x"], env)[0].instances == [U + "x"]


# --- the Auth Proxy's own config-file scenarios ---------------------------------------------


def test_go_style_toml(tmp_path: Path) -> None:
    """The Auth Proxy's sample: a port given as a string, several booleans."""
    path = tmp_path / "config-toml.toml"
    path.write_text(
        f'instance-uri = "{U}"\ndebug = true\nport = "5555"\ndebug-logs = true\n'
        "auto-iam-authn = true\n"
    )
    args, _ = parse(["--config-file", str(path)])
    assert (args.instances, args.debug, args.port, args.debug_logs, args.auto_iam_authn) == (
        [U],
        True,
        5555,
        True,
        True,
    )


def test_command_line_false_beats_file_true(tmp_path: Path) -> None:
    path = write_config(tmp_path, ".toml", {"debug": True})
    assert parse([U, "--config-file", str(path), "--debug=false"])[0].debug is False


def test_environment_false_beats_file_true(tmp_path: Path) -> None:
    path = write_config(tmp_path, ".toml", {"debug": True})
    env = {"ALLOYDB_PROXY_DEBUG": "false"}
    assert parse([U, "--config-file", str(path)], env)[0].debug is False


def test_command_line_beats_environment() -> None:
    assert parse([U, "--debug"], {"ALLOYDB_PROXY_DEBUG": "false"})[0].debug is True
    assert parse([U, "--port", "6000"], {"ALLOYDB_PROXY_PORT": "7000"})[0].port == 6000


def test_config_file_from_environment(tmp_path: Path) -> None:
    from_env = write_config(tmp_path, ".toml", {"port": 6000}, name="env")
    from_cli = write_config(tmp_path, ".toml", {"port": 7000}, name="cli")
    env = {"ALLOYDB_PROXY_CONFIG_FILE": str(from_env)}
    assert parse([U], env)[0].port == 6000
    assert parse([U, "--config-file", str(from_cli)], env)[0].port == 7000


def test_file_keys_are_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'Instance-URI = "{U}"\nPORT = 6000\n')
    args, _ = parse(["--config-file", str(path)])
    assert (args.instances, args.port) == ([U], 6000)


def test_key_without_value_is_unset(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("token:\nport: 6000\n")
    args, explicit = parse(["--config-file", str(path), U])
    assert (args.token, args.port) == (None, 6000)
    assert "token" not in explicit
    json_path = write_config(tmp_path, ".json", {"unix-socket": None})
    assert parse(["--config-file", str(json_path), U])[0].unix_socket is None


def test_empty_files_set_nothing(tmp_path: Path) -> None:
    default = vars(parse([U])[0])
    for name in ("e.toml", "e.yaml", "e.yml"):
        (tmp_path / name).write_text("")
        args = vars(parse(["--config-file", str(tmp_path / name), U])[0])
        assert {k: v for k, v in args.items() if k != "config_file"} == {
            k: v for k, v in default.items() if k != "config_file"
        }


def test_empty_environment_variable_is_unset() -> None:
    args, explicit = parse([U], {"ALLOYDB_PROXY_PORT": "", "ALLOYDB_PROXY_ADDRESS": ""})
    assert (args.port, args.address) == (5432, "127.0.0.1")
    assert not {"port", "address"} & explicit


@pytest.mark.parametrize("value", ["1", "t", "T", "true", "TRUE", "True", "yes", "on"])
def test_environment_true(value: str) -> None:
    assert parse([U], {"ALLOYDB_PROXY_PSC": value})[0].psc is True


@pytest.mark.parametrize("value", ["0", "f", "F", "false", "FALSE", "no", "off"])
def test_environment_false(value: str) -> None:
    assert parse([U], {"ALLOYDB_PROXY_PSC": value})[0].psc is False


def test_fastproxy_prefix_wins_across_aliases() -> None:
    env = {"ALLOYDB_PROXY_EXIT_ZERO_SIGTERM": "true", "FASTPROXY_EXIT_ZERO_ON_SIGTERM": "false"}
    assert parse([U], env)[0].exit_zero_sigterm is False
    env = {"FASTPROXY_EXIT_ZERO_ON_SIGTERM": "true", "ALLOYDB_PROXY_EXIT_ZERO_SIGTERM": "false"}
    assert parse([U], env)[0].exit_zero_sigterm is True


def test_only_the_winning_variable_is_converted() -> None:
    env = {"ALLOYDB_PROXY_PORT": "not-a-port", "FASTPROXY_PORT": "6000"}
    assert parse([U], env)[0].port == 6000


def test_explicit_holds_what_the_user_set(tmp_path: Path) -> None:
    path = write_config(tmp_path, ".json", {"http-port": 9999})
    _, explicit = parse(
        ["--config-file", str(path), "--debug=false", "-a", "::1", U], {"FASTPROXY_PORT": "1"}
    )
    assert {"http_port", "debug", "address", "port", "config_file"} <= explicit
    assert "admin_port" not in explicit
    assert parse([U])[1] == set()


def test_parser_defaults_survive_layered_parsing(tmp_path: Path) -> None:
    """parse_layered borrows the parser's defaults for the layers and gives them back."""
    parser = build_parser()
    path = write_config(tmp_path, ".toml", {"admin-port": 1234})
    parse_layered(parser, ["--config-file", str(path), U], {"ALLOYDB_PROXY_PORT": "6000"})
    again, explicit = parse_layered(parser, [U], {})
    assert (again.port, again.admin_port, again.config_file) == (5432, 9091, None)
    assert explicit == set()


# --- errors, each naming the place to fix -----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALLOYDB_PROXY_PORT": "abc"}, "invalid value for ALLOYDB_PROXY_PORT: 'abc' (want an"),
        ({"FASTPROXY_MAX_CONNECTIONS": "1.5"}, "invalid value for FASTPROXY_MAX_CONNECTIONS"),
        (
            {"ALLOYDB_PROXY_DEBUG": "maybe"},
            "invalid value for ALLOYDB_PROXY_DEBUG: 'maybe' (want true or false)",
        ),
        ({"ALLOYDB_PROXY_CONFIG_FILE": "/nonexistent/c.json"}, "cannot read config file"),
    ],
    ids=["int", "int-float", "bool", "config-file"],
)
def test_environment_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        parse([U], env)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.ini", "port = 1", "should have extension of toml, yaml, or json"),
        ("c", "port = 1", "should have extension of toml, yaml, or json"),
        ("c.toml", "port = ", "failed to load configuration from"),
        ("c.yaml", "port: [1", "failed to load configuration from"),
        ("c.json", '{"port": 1,}', "failed to load configuration from"),
        ("c.toml", "bogus = 1", "unknown key 'bogus'"),
        ("c.toml", 'config-file = "other.toml"', "unknown key 'config-file'"),
        ("c.toml", 'port = "abc"', "key 'port': 'abc' (want an integer)"),
        ("c.toml", "port = 1.5", "key 'port': '1.5' (want an integer)"),
        ("c.toml", 'debug = "maybe"', "key 'debug': 'maybe' (want true or false)"),
        ("c.json", '{"address": ["a", "b"]}', "key 'address': expected a single value"),
        ("c.json", '{"instance-uri": 5}', "'instance-uri' must be a string"),
        ("c.json", "[1, 2]", "expected a table/mapping of flag names"),
    ],
    ids=[
        "extension",
        "no-extension",
        "malformed-toml",
        "malformed-yaml",
        "malformed-json",
        "unknown-key",
        "config-file-key",
        "bad-int",
        "float-for-int",
        "bad-bool",
        "list-value",
        "instance-not-string",
        "not-a-mapping",
    ],
)
def test_config_file_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        parse(["--config-file", str(path), U])
    text = str(info.value)
    assert message in text and "\n" not in text, text
    if name.endswith((".toml", ".yaml", ".json")):
        assert str(path) in text  # the message names the file to fix


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*: No such file"):
        load_config_file(tmp_path / "absent.toml")


def test_bad_boolean_assignment_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"invalid value for --psc: 'yes please'"):
        parse(["--psc=yes please", U])
