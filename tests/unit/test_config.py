"""Settings resolve as flags > ZSPLIT_* > TOML (profile over base, section over shared) > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_split.cli import main, parse_settings
from zimage_split.cli.flags import client_security
from zimage_split.cli.serve import encoder_config
from zimage_split.common.errors import InvalidArgument, NotFound

TOML = """
model = "shared-model"
max_queue = 5

[generator]
port = 6001
max_queue = 6
insecure = true

[profiles.prod]
max_queue = 7

[profiles.prod.generator]
port = 6002
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (
        "ZSPLIT_PORT",
        "ZSPLIT_MAX_QUEUE",
        "ZSPLIT_MODEL",
        "ZSPLIT_CONFIG",
        "ZSPLIT_PROFILE",
        "ZSPLIT_AUTH_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "zsplit.toml"
    path.write_text(TOML)
    return path


def resolved(*argv: str):  # type: ignore[no-untyped-def]
    return parse_settings(["serve", "generator", *argv]).resolved


def test_each_layer_overrides_the_one_below(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = resolved("--config", str(config_file))
    assert (base.model, base.max_queue, base.port, base.insecure) == ("shared-model", 6, 6001, True)
    assert base.settings["port"].source == f"config {config_file} [generator]"
    assert resolved().port == 50052 and resolved().settings["port"].source == "default"

    prod = resolved("--config", str(config_file), "--profile", "prod")
    assert (prod.max_queue, prod.port) == (7, 6002)

    monkeypatch.setenv("ZSPLIT_PORT", "6003")
    monkeypatch.setenv("ZSPLIT_INSECURE", "false")
    env = resolved("--config", str(config_file), "--profile", "prod")
    assert (env.port, env.insecure) == (6003, False) and env.settings["port"].source == "env ZSPLIT_PORT"

    flag = resolved("--config", str(config_file), "--profile", "prod", "--port", "6004")
    assert flag.port == 6004 and flag.settings["port"].source == "flag"


def test_the_config_file_can_come_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZSPLIT_CONFIG", str(config_file))
    monkeypatch.setenv("ZSPLIT_PROFILE", "prod")
    assert resolved().port == 6002


def test_mistakes_in_the_file_are_named(tmp_path: Path, config_file: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[generator]\nprot = 1\n")
    with pytest.raises(InvalidArgument, match="unknown setting 'prot'"):
        resolved("--config", str(bad))
    bad.write_text('auth_token = "hunter2"\n')
    with pytest.raises(InvalidArgument, match="is a secret"):
        resolved("--config", str(bad))
    bad.write_text("[generator]\nport = 'many'\n")
    with pytest.raises(InvalidArgument, match="'many' is not a valid port"):
        resolved("--config", str(bad))
    with pytest.raises(NotFound, match="No profile 'staging'"):
        resolved("--config", str(config_file), "--profile", "staging")
    with pytest.raises(NotFound, match="No config file"):
        resolved("--config", str(tmp_path / "missing.toml"))


def test_config_show_redacts_secrets(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZSPLIT_AUTH_TOKEN", "hunter2-secret")
    assert main(["config", "show", "generator", "--config", str(config_file), "--", "--port", "7"]) == 0
    shown = capsys.readouterr().out
    assert "hunter2-secret" not in shown
    assert 'auth_token = "<redacted>"' in shown and "port = 7  # flag" in shown
    assert f'model = "shared-model"  # config {config_file}' in shown


def test_servers_need_tls_or_an_explicit_insecure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZSPLIT_INSECURE", raising=False)
    monkeypatch.delenv("ZSPLIT_CONFIG", raising=False)
    assert main(["serve", "encoder", "--model", "tiny"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_clients_need_tls_or_insecure_off_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--generator", "203.0.113.9:50052", "--no-progress"]) == 2
    assert "--tls-ca" in capsys.readouterr().err


def test_repeatable_flags_take_a_list_from_the_file_or_commas_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZSPLIT_LORA", raising=False)
    settings = tmp_path / "zsplit.toml"
    settings.write_text('[client]\nlora = ["style:0.5", "people/alice"]\n')
    assert parse_settings(["generate", "x", "--config", str(settings)]).lora == ["style:0.5", "people/alice"]
    monkeypatch.setenv("ZSPLIT_LORA", "ink:0.3, style")
    assert parse_settings(["generate", "x"]).lora == ["ink:0.3", "style"]
    # Flags win over both, as for every setting.
    assert parse_settings(["generate", "x", "--lora", "a", "--lora", "b:2"]).lora == ["a", "b:2"]


def test_an_on_off_flag_is_a_boolean_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--pack-weights/--no-pack-weights`: the setting is the value, from the file, the environment or a flag."""
    monkeypatch.delenv("ZSPLIT_PACK_WEIGHTS", raising=False)

    def encoder(*argv: str):  # type: ignore[no-untyped-def]
        return parse_settings(["serve", "encoder", *argv]).resolved

    assert encoder().pack_weights is True
    path = tmp_path / "zsplit.toml"
    path.write_text("[encoder]\npack_weights = false\n")
    assert encoder("--config", str(path)).pack_weights is False
    assert encoder("--config", str(path), "--pack-weights").pack_weights is True
    monkeypatch.setenv("ZSPLIT_PACK_WEIGHTS", "false")
    assert encoder().pack_weights is False and encoder("--pack-weights").pack_weights is True
    monkeypatch.setenv("ZSPLIT_PACK_WEIGHTS", "maybe")
    with pytest.raises(InvalidArgument, match="not a boolean"):
        encoder()


def test_plaintext_needs_insecure_unless_loopback_and_the_message_says_loopback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZSPLIT_INSECURE", raising=False)
    # 0.0.0.0 and a LAN address may well be this host's own; what plaintext needs is loopback.
    for address in ("0.0.0.0:50052", "192.168.1.20"):
        assert main(["generate", "x", "--generator", address, "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert f"{address} is not a loopback address (127.0.0.1, ::1 or localhost)" in error
        assert "on this host" not in error and "--insecure" in error and "--tls-ca CA.pem" in error
    args = parse_settings(["generate", "x", "--generator", "::1"])
    assert client_security(args, args.generator).insecure  # a bare loopback host is loopback too


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "x", "--generator", "127.0.0.1:1", "--insecure", "--tls-ca", "ca.pem"],
            "--insecure (plaintext) contradicts --tls-ca (TLS)",
        ),
        (
            [
                "lora",
                "list",
                "--generator",
                "10.0.0.5",
                "--insecure",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
            ],
            "--insecure (plaintext) contradicts --tls-cert, --tls-key (TLS)",
        ),
        (
            ["generate", "x", "--generator", "10.0.0.5", "--insecure", "--tls-server-name", "gpu.internal"],
            "--insecure (plaintext) contradicts --tls-server-name (TLS)",
        ),
        (
            ["serve", "generator", "--model", "tiny", "--insecure", "--encoder-insecure"]
            + ["--encoder-tls-ca", "ca.pem"],
            "--encoder-insecure (plaintext) contradicts --encoder-tls-ca (TLS)",
        ),
        (
            ["serve", "encoder", "--model", "tiny", "--insecure", "--tls-client-ca", "ca.pem"],
            "--insecure (plaintext) contradicts --tls-client-ca (TLS)",
        ),
        (
            ["serve", "http", "--insecure", "--tls-key", "k.pem"],
            "--insecure (plain HTTP) contradicts --tls-key (HTTPS)",
        ),
    ],
)
def test_insecure_with_tls_settings_is_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--insecure beside TLS settings used to be dropped without a word (the client used TLS anyway)."""
    for name in ("ZSPLIT_INSECURE", "ZSPLIT_CONFIG", "ZSPLIT_GENERATOR", "ZSPLIT_ENCODER_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_insecure_from_the_environment_with_a_tls_flag_is_refused_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZSPLIT_INSECURE", "1")
    assert main(["generate", "x", "--generator", "127.0.0.1:1", "--tls-ca", "ca.pem"]) == 2
    assert "--insecure (plaintext) contradicts --tls-ca (TLS)" in capsys.readouterr().err


def test_reuse_port_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZSPLIT_REUSE_PORT", raising=False)

    def transport(*argv: str):  # type: ignore[no-untyped-def]
        return encoder_config(parse_settings(["serve", "encoder", "--insecure", *argv])).transport

    assert transport().reuse_port is False
    assert ("grpc.so_reuseport", 0) in transport().grpc_options()
    assert transport("--reuse-port").reuse_port is True
    assert ("grpc.so_reuseport", 1) in transport("--reuse-port").grpc_options()
    monkeypatch.setenv("ZSPLIT_REUSE_PORT", "true")
    assert transport().reuse_port is True


def test_the_embedding_store_limit_comes_from_any_layer_in_gib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_split.cli.serve import generator_config

    for name in (
        "ZSPLIT_EMBEDDING_STORE",
        "ZSPLIT_EMBEDDING_STORE_MAX_GB",
        "ZSPLIT_CONFIG",
        "ZSPLIT_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)

    def config(*argv: str):  # type: ignore[no-untyped-def]
        return generator_config(parse_settings(["serve", "generator", "--insecure", *argv]))

    assert config().embedding_store_max_bytes is None
    path = tmp_path / "zsplit.toml"
    path.write_text(f'[generator]\nembedding_store = "{tmp_path}/store"\nembedding_store_max_gb = 0.5\n')
    assert config("--config", str(path)).embedding_store_max_bytes == 1 << 29
    monkeypatch.setenv("ZSPLIT_EMBEDDING_STORE_MAX_GB", "2")
    assert config("--config", str(path)).embedding_store_max_bytes == 2 << 30
    assert (
        config("--config", str(path), "--embedding-store-max-gb", "0.25").embedding_store_max_bytes == 1 << 28
    )
    monkeypatch.setenv("ZSPLIT_EMBEDDING_STORE_MAX_GB", "lots")
    with pytest.raises(InvalidArgument, match="ZSPLIT_EMBEDDING_STORE_MAX_GB: 'lots' is not a valid"):
        config("--config", str(path))
