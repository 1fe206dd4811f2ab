"""The ``dcp`` command and broker configuration."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import dcp
from dcp import logs
from dcp.cli import build_parser, main
from dcp.config import BrokerConfig, OrchestratorConfig
from dcp.errors import ConfigError


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["broker", "--mode", "bogus"], ["nonsense"], [], ["broker", "--ports", "many"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("command, config_class", [("broker", BrokerConfig), ("orchestrator", OrchestratorConfig)])
def test_every_config_field_has_a_flag(capsys: pytest.CaptureFixture[str], command: str, config_class: type) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for name, field in config_class.__dataclass_fields__.items():
        assert field.metadata.get("flag", "--" + field.metadata.get("key", name).replace("_", "-")) in text


def test_the_policy_file_keeps_its_documented_name(tmp_path: Path) -> None:
    """The attribute says what it holds (``policy_file``); users still write ``policy``."""
    path = tmp_path / "orchestrator.toml"
    path.write_text('[orchestrator]\npolicy = "rules.toml"\n')
    assert OrchestratorConfig.from_sources(path).policy_file == "rules.toml"
    assert OrchestratorConfig.from_sources(path, {"policy_file": "flag.toml"}).policy_file == "flag.toml"
    assert build_parser().parse_args(["orchestrator", "--policy", "flag.toml"]).policy_file == "flag.toml"
    path.write_text('[orchestrator]\npolicy_file = "rules.toml"\n')
    with pytest.raises(ConfigError, match=r"unknown orchestrator setting\(s\) in .*: policy_file \(did you mean 'policy'\?\)$"):
        OrchestratorConfig.from_sources(path)


def test_toml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nmode = "stateful"\nports = 8\nout_buffer_bytes = 65536\n')
    config = BrokerConfig.from_sources(path, {"ports": 16})
    assert (config.mode, config.ports, config.out_buffer_bytes) == ("stateful", 16, 65536)


def test_flags_then_environment_then_toml_then_defaults(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nmode = "stateful"\nports = 8\nout_buffer_bytes = 65536\n')
    environ = {"DCP_BROKER_PORTS": "16", "DCP_BROKER_INSECURE": "yes", "DCP_BROKER_PEERS": "127.0.0.1:7401, 127.0.0.1:7402",
               "DCP_ORCHESTRATOR_PORTS": "nothing of the broker's", "DCP_TOKEN": "not a setting"}
    layers = BrokerConfig.layers(path, {"out_buffer_bytes": 1024}, environ)
    config = BrokerConfig.from_layers(layers)
    assert (config.mode, config.ports, config.out_buffer_bytes, config.insecure) == ("stateful", 16, 1024, True)
    assert config.peers == ("127.0.0.1:7401", "127.0.0.1:7402") and config.link_timeout_s == 5.0
    assert {name: origin for name, (_, origin) in layers.items()} == {
        "mode": str(path), "ports": "DCP_BROKER_PORTS", "out_buffer_bytes": "flag", "insecure": "DCP_BROKER_INSECURE",
        "peers": "DCP_BROKER_PEERS",
    }
    assert BrokerConfig.from_sources(path, {"ports": 32}, environ).ports == 32
    assert OrchestratorConfig.from_sources(None, None, {"DCP_ORCHESTRATOR_POLICY": "rules.toml"}).policy_file == "rules.toml"


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"DCP_BROKER_LISTN": "127.0.0.1:1"},
         "DCP_BROKER_LISTN names no broker setting (did you mean 'DCP_BROKER_LISTEN'?); they are DCP_BROKER_{LISTEN, "),
        ({"DCP_BROKER_PORTS": "many"}, "DCP_BROKER_PORTS='many' is not a valid int"),
        ({"DCP_BROKER_LINK_TIMEOUT_S": "soon"}, "DCP_BROKER_LINK_TIMEOUT_S='soon' is not a valid float"),
        ({"DCP_BROKER_INSECURE": "sure"}, "DCP_BROKER_INSECURE='sure': say 1/true/yes/on or 0/false/no/off"),
        ({"DCP_BROKER_MODE": "fast"}, "mode must be one of"),
    ],
)
def test_a_bad_environment_variable_is_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_sources(None, None, environ)
    assert message in str(info.value)


@pytest.mark.parametrize("command, config_class", [("broker", BrokerConfig), ("orchestrator", OrchestratorConfig)])
def test_print_config_shows_every_setting_with_its_origin_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, config_class: type
) -> None:
    section = command.upper()
    monkeypatch.setenv(f"DCP_{section}_HELLO_TIMEOUT_S", "2.5")
    monkeypatch.setenv(f"DCP_{section}_INSECURE", "1")
    assert main([command, "--print-config", "--listen", "127.0.0.1:7999", "--log-level", "debug"]) == 0
    printed = capsys.readouterr().out
    assert f'hello_timeout_s = 2.5  # DCP_{section}_HELLO_TIMEOUT_S' in printed
    assert 'listen = "127.0.0.1:7999"  # flag' in printed and "max_connections_per_name = 16  # default" in printed
    for name, field in config_class.__dataclass_fields__.items():
        assert field.metadata.get("key", name) in printed
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    monkeypatch.delenv(f"DCP_{section}_HELLO_TIMEOUT_S")
    monkeypatch.delenv(f"DCP_{section}_INSECURE")
    expected = config_class.from_sources(None, {"listen": "127.0.0.1:7999", "log_level": "debug"}, {
        f"DCP_{section}_HELLO_TIMEOUT_S": "2.5", f"DCP_{section}_INSECURE": "1"})
    assert config_class.from_sources(path) == expected  # what it prints is a config file that gives the same settings


@pytest.mark.parametrize(
    "text, message",
    [
        ('[broker]\nmode = "fast"\n', "mode must be one of"),
        ("[broker]\nport = 1\n", "unknown broker setting(s) in {path}: port (did you mean 'ports'?)"),
        ('[broker]\nslow-consumer = "pause"\nvolume = 11\n',
         "unknown broker setting(s) in {path}: slow-consumer (did you mean 'slow_consumer'?), volume"),
        ('[broker]\nslow_consumer = "drop_newest"\n', "got 'drop_newest' (did you mean 'drop-newest'?)"),
        ("[broker]\nports = 8\nkey = 7\n", "must be greater than 2**8 "),
        ("[broker\n", "not valid TOML"),
        ('[broker]\nlisten = "nowhere"\n', "is not HOST:PORT"),
    ],
)
def test_bad_config_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_sources(path)
    assert message.format(path=path) in str(info.value)


def test_unknown_settings_of_either_daemon_suggest_the_nearest_one(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.toml"
    path.write_text('[orchestrator]\nhello_timeout = 2\n')
    with pytest.raises(ConfigError, match=r"orchestrator setting\(s\) in .*: hello_timeout \(did you mean 'hello_timeout_s'\?\)$"):
        OrchestratorConfig.from_sources(path)
    with pytest.raises(ConfigError, match=r"unknown broker setting\(s\): slow_consumers \(did you mean 'slow_consumer'\?\)$"):
        BrokerConfig.from_sources(None, {"slow_consumers": "pause"})


def test_config_error_exits_1_with_its_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_broker_process_from_toml_and_stats_command(tmp_path: Path, broker_process) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nmode = "stateful"\nports = 8\nkey = 263\n')
    broker = broker_process("--config", str(path))
    assert (broker.mode, broker.key) == ("stateful", 263)
    address = f"{broker.host}:{broker.port}"
    out = subprocess.run([sys.executable, "-m", "dcp", "stats", address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "mode=stateful  key=263  ports=8" in out.stdout
    out = subprocess.run([sys.executable, "-m", "dcp", "stats", address, "--json"], capture_output=True, text=True, timeout=60)
    stats = json.loads(out.stdout)
    assert (stats["key"], stats["frames_in"], set(stats["drops"])) == ("263", 0, {
        "no_route", "unattached_port", "slow_consumer", "hop_limit", "route_too_large", "rejected", "truncated", "link_down",
        "route_unsigned", "route_forged", "route_expired", "route_stale"})
    code, log = broker.stop()
    assert code == 0, log


def test_stats_of_nothing_is_a_clear_error() -> None:
    out = subprocess.run([sys.executable, "-m", "dcp", "stats", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("dcp stats:")


def test_link_and_unlink_commands(broker_process) -> None:
    from dcp.routing import allocate_keys

    keys = allocate_keys(2, 64)
    a = broker_process("--ports", "64", "--key", str(keys[0]), "--name", "a")
    b = broker_process("--ports", "64", "--key", str(keys[1]), "--name", "b")
    dcp_cmd = [sys.executable, "-m", "dcp"]
    out = subprocess.run([*dcp_cmd, "link", f"{a.host}:{a.port}", f"{b.host}:{b.port}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("link on port 0 <-> ") and out.stdout.strip().endswith("port 0")
    out = subprocess.run([*dcp_cmd, "stats", f"{b.host}:{b.port}", "--json"], capture_output=True, text=True, timeout=60)
    (link,) = json.loads(out.stdout)["links"]
    assert (link["direction"], link["state"], link["remote_name"], link["remote_key"]) == ("in", "up", "a", str(keys[0]))
    out = subprocess.run([*dcp_cmd, "unlink", f"{a.host}:{a.port}", "9"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no_link" in out.stderr
    out = subprocess.run([*dcp_cmd, "unlink", f"{a.host}:{a.port}", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*dcp_cmd, "link", f"{a.host}:{a.port}", "127.0.0.1:1", "--wait", "0.3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "link_timeout" in out.stderr and "unlinked" in out.stderr
    for proc in (a, b):
        code, log = proc.stop()
        assert code == 0, log
    assert any("link port 0 removed" in line for line in b.log)


@pytest.fixture
def dcp_logger() -> Iterator[logging.Logger]:
    """The ``dcp`` logger, put back as it was after a test that configures logging."""
    logger = logging.getLogger("dcp")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield logger
    for handler in logger.handlers:
        if handler not in saved[2]:
            handler.close()
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


def test_json_logs_are_one_object_per_line_with_the_fields_a_call_passed(
    dcp_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json", daemon="b7")
    log = logging.getLogger("dcp.broker")
    log.info("attached %s", "cam", extra={"port": 3, "peer": ("127.0.0.1", 5000)})
    log.debug("not at info")
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.error("closing", exc_info=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message", "daemon", "fields"}
    assert (first["level"], first["logger"], first["message"], first["daemon"]) == ("INFO", "dcp.broker", "attached cam", "b7")
    assert first["fields"] == {"port": 3, "peer": ["127.0.0.1", 5000]}
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second["level"] == "ERROR" and "ValueError: bad frame" in second["exc"]


def test_a_log_config_file_replaces_level_and_format(dcp_logger: logging.Logger, tmp_path: Path) -> None:
    target = tmp_path / "dcp.log"
    config = tmp_path / "logging.toml"
    config.write_text(
        f'[handlers.file]\nclass = "logging.FileHandler"\nfilename = "{target}"\n'
        '[loggers.dcp]\nlevel = "DEBUG"\nhandlers = ["file"]\npropagate = false\n'
    )
    logs.configure("error", "json", str(config))
    logging.getLogger("dcp.x").debug("to the file, at debug")
    for handler in dcp_logger.handlers:
        handler.flush()
    assert target.read_text() == "to the file, at debug\n"
    for text, message in (("handlers = 3\n", "cannot be applied"), ("[x\n", "is not valid TOML")):
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            logs.configure(config_file=str(config))
    with pytest.raises(ConfigError, match="the log config: cannot read"):
        logs.configure(config_file=str(tmp_path / "missing.toml"))


def test_a_broker_process_logs_json_lines(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcp", "broker", "--insecure", "--listen", "127.0.0.1:0", "--name", "b7", "--log-format", "json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            record = json.loads(line)  # every line: the process logs nothing else
            assert record["daemon"] == "b7"
            if record["message"].startswith("dcp broker listening on"):
                break
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("command", ["broker", "orchestrator"])
def test_help_says_only_defaults_worth_saying(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: )" not in text and "see help" not in text and "(default: None)" not in text
    assert "(default: info)" in text  # the log level


def test_a_command_that_cannot_connect_names_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["stats", f"127.0.0.1:{port}"]) == 1
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in capsys.readouterr().err
    with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}"):  # still the error an application catches
        asyncio.run(_dial(port))


async def _dial(port: int) -> None:
    await dcp.connect(f"dcp://127.0.0.1:{port}", reconnect=False)
