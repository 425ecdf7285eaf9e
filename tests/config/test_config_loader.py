"""One configuration: every flag declared once on a config dataclass, read from the command line,
PDMESH_<FLAG> or a --config TOML file (in that order of precedence), composed by serve and handed
to children whole."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pdmesh import config_loader
from pdmesh.child import TPFollowerSpec
from pdmesh.cli import COMMANDS, build_parser, command_flags, configs_from
from pdmesh.config import SchedulerConfig, WorkerConfig
from pdmesh.errors import InvalidRequestError
from pdmesh.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str], env: dict[str, str] | None = None):
    return configs_from(build_parser().parse_args(argv), env or {})


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help_and_shows_in_help_output(command):
    flags = command_flags(command)
    assert flags
    out = subprocess.run([sys.executable, "-m", "pdmesh.cli", command, "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in flags.values():
        assert flag.help, flag.name
        assert f"--{flag.name}" in out
        assert flag.env in out.replace("\n", " ").replace("  ", " ") or flag.env[:20] in out


def test_readme_flag_tables_match_the_parser():
    assert subprocess.run([sys.executable, str(ROOT / "tools" / "gen_readme.py"), "--check"]).returncode == 0


def test_serve_sets_what_any_worker_can():
    """serve composes the scheduler's and the workers' configs: kv-timeout, held-kv-ttl and
    prefill-timeout (missing from serve before) reach every worker, --model and --max-model-len
    reach the scheduler and the workers alike."""
    config = parse(["serve", "--kv-timeout", "4", "--held-kv-ttl", "7", "--prefill-timeout", "9",
                    "--model", "/m.gguf", "--max-model-len", "512", "--prefill-workers", "2", "--port", "6000"])
    assert isinstance(config, ServeConfig)
    assert config.scheduler.model == "/m.gguf" and config.scheduler.max_model_len == 512
    worker = config.worker_config("prefill", 1)
    assert (worker.kv_timeout_s, worker.held_kv_ttl_s, worker.prefill_timeout_s) == (4, 7, 9)
    assert worker.model == "/m.gguf" and worker.engine.max_model_len == 512
    assert worker.worker_id == "prefill-1" and worker.role == "prefill"
    assert worker.scheduler_address == "127.0.0.1:50052" and worker.listen.port == 0  # the internal face
    assert worker.cpu.nice == 10 and config.worker_config("decode", 0).cpu.nice == 0


def test_precedence_command_line_over_environment_over_file(tmp_path):
    file = tmp_path / "pdmesh.toml"
    file.write_text('kv-timeout = 5\nheld_kv_ttl = 6\nblock-size = 32\n')
    env = {"PDMESH_KV_TIMEOUT": "7", "PDMESH_HELD_KV_TTL": "8"}
    config = parse(["decode", "--config", str(file), "--kv-timeout", "9"], env)
    assert isinstance(config, WorkerConfig) and config.role == "decode"
    assert config.kv_timeout_s == 9  # command line
    assert config.held_kv_ttl_s == 8  # environment
    assert config.engine.block_size == 32  # file
    assert config.prefill_timeout_s == 30  # default


def test_booleans_and_unset_optionals():
    assert parse(["serve", "--no-warmup"]).warmup is False
    assert parse(["serve"], {"PDMESH_WARMUP": "off"}).warmup is False
    assert parse(["serve", "--prefill-nice", "3"]).prefill.nice == 3
    assert parse(["scheduler"]).tenants_file is None


@pytest.mark.parametrize("env,file_text,needle", [
    ({"PDMESH_KV_TIMEOUT": "soon"}, "", "$PDMESH_KV_TIMEOUT: 'soon' is not a valid float"),
    ({"PDMESH_DTYPE": "float8"}, "", "$PDMESH_DTYPE: 'float8' is not one of float32, bfloat16"),
    ({}, "kv-timeuot = 3\n", "unknown setting(s) kv-timeuot"),
    ({}, "block-size = \"big\"\n", "block-size: 'big' is not a valid int"),
])
def test_bad_settings_name_their_source_and_value(tmp_path, env, file_text, needle):
    file = tmp_path / "bad.toml"
    file.write_text(file_text)
    with pytest.raises(config_loader.ConfigError) as err:
        parse(["prefill", "--config", str(file)], env)
    assert needle in str(err.value)


def test_values_are_validated_by_the_dataclasses():
    with pytest.raises(InvalidRequestError, match="tensor parallelism needs the pdmesh engine"):
        parse(["serve", "--decode-tp", "2", "--engine", "echo"])
    with pytest.raises(InvalidRequestError, match="kv_timeout_s must be > 0, got 0.0"):
        parse(["decode", "--kv-timeout", "0"])
    with pytest.raises(InvalidRequestError, match="heartbeat_timeout_s must exceed"):
        parse(["scheduler", "--heartbeat-interval", "5"])


def test_the_cli_reports_a_bad_setting_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "pdmesh.cli", "decode"], capture_output=True, text=True,
                            env={"PDMESH_KV_TIMEOUT": "-1", "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert "pdmesh decode: kv_timeout_s must be > 0, got -1.0" in result.stderr


def test_children_get_their_config_whole():
    serve = parse(["serve", "--decode-tp", "2", "--dtype", "bfloat16"])
    worker = serve.worker_config("decode", 0)
    worker = replace(worker, security=replace(worker.security, cluster_secret="s3cret"), restarts=2)
    assert config_loader.from_json(WorkerConfig, config_loader.to_json(worker)) == worker
    spec = TPFollowerSpec(worker, 1, "10.0.0.5", 1234)
    assert config_loader.from_json(TPFollowerSpec, config_loader.to_json(spec)) == spec
    assert config_loader.from_json(ServeConfig, config_loader.to_json(serve)) == serve
    scheduler = replace(serve.scheduler, restarts=1)
    assert config_loader.from_json(SchedulerConfig, config_loader.to_json(scheduler)) == scheduler


def test_advertised_address_defaults_to_the_bind_address():
    worker = parse(["prefill", "--host", "10.1.2.3"])
    assert worker.listen.dial(7000) == "10.1.2.3:7000"
    worker = parse(["prefill", "--host", "0.0.0.0", "--advertise-address", "prefill-0.mesh"])
    assert worker.listen.dial(7000) == "prefill-0.mesh:7000"
    assert parse(["prefill", "--host", "::1"]).listen.dial(7000) == "[::1]:7000"
    assert parse(["prefill", "--host", "0.0.0.0"]).listen.advertised_host() not in ("0.0.0.0", "")
