"""`switchyard serve` options become a validated ServeConfig; bad input exits 2 naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switchyard.cli import _build_parser, _serve_config, main
from switchyard.config import ServeConfig
from switchyard.errors import ConfigError
from switchyard.router.gateway.connection import limited_protocol


def _config(*argv: str) -> ServeConfig:
    return _serve_config(_build_parser().parse_args(["serve", *argv]))


def test_no_flags_gives_the_model_defaults() -> None:
    """Defaults live in ServeConfig: two vLLM instances, dualmap, 127.0.0.1:8000, no auth."""
    config = _config()
    assert config == ServeConfig()
    assert (config.instances, config.engine.kind, config.router.policy) == (2, "vllm", "dualmap")
    assert (config.gateway.host, config.gateway.port, config.gateway.api_keys) == ("127.0.0.1", 8000, ())


def test_flags_override_config_file(tmp_path: Path) -> None:
    """--config supplies pools and sections; explicit flags win over the file."""
    path = tmp_path / "serve.json"
    path.write_text(
        json.dumps(
            {
                "engine": {"kind": "sim"},
                "router": {"policy": "round_robin"},
                "pools": [
                    {"name": "prefill", "role": "prefill", "instances": 1},
                    {"name": "decode", "role": "decode", "instances": 3, "ray_resource": "pool-decode"},
                ],
            }
        )
    )
    config = _config("--config", str(path), "--policy", "least_load", "--port", "9001")
    assert config.router.policy == "least_load"
    assert config.gateway.port == 9001
    assert config.engine.kind == "sim"
    pools = config.effective_pools()
    assert [(p.name, p.role, p.instances) for p in pools] == [
        ("prefill", "prefill", 1),
        ("decode", "decode", 3),
    ]
    assert all(p.engine is not None and p.engine.kind == "sim" for p in pools)


def test_gateway_connection_limits_from_the_config_file_reach_the_protocol(tmp_path: Path) -> None:
    """The README's ``gateway:`` limits survive a --config plus flags, and become the attributes
    the connection protocol enforces (issue #16 item 5)."""
    path = tmp_path / "serve.yaml"
    path.write_text("gateway: {max_header_bytes: 8192, header_timeout_s: 5, body_timeout_s: 30}\n")
    config = _config("--config", str(path), "--port", "9001")
    gateway = config.gateway
    assert (gateway.port, gateway.max_header_bytes, gateway.header_timeout_s, gateway.body_timeout_s) == (
        9001,
        8192,
        5.0,
        30.0,
    )
    protocol = limited_protocol(gateway)
    assert (protocol.max_header_bytes, protocol.header_timeout_s, protocol.body_timeout_s) == (  # type: ignore[attr-defined]
        8192,
        5.0,
        30.0,
    )


def _keys(config: ServeConfig) -> list[str]:
    return [k.get_secret_value() for k in config.gateway.api_keys]


def test_api_keys_from_a_file_the_environment_or_flags_never_two_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """API keys come from one place: --api-key-file/SWITCHYARD_API_KEY_FILE (one key a line, so a
    Secret can hold the old and the new key), SWITCHYARD_API_KEY or --api-key (which ps shows);
    any of them overrides --config's gateway.api_keys, and none of their values reach a repr."""
    monkeypatch.delenv("SWITCHYARD_API_KEY", raising=False)
    monkeypatch.delenv("SWITCHYARD_API_KEY_FILE", raising=False)
    keyfile = tmp_path / "keys"
    keyfile.write_text("  key-old \n\nkey-new\n")
    config = _config("--api-key-file", str(keyfile))
    assert _keys(config) == ["key-old", "key-new"] and "key-old" not in repr(config)
    assert _keys(_config("--api-key", "a", "--api-key", "b")) == ["a", "b"]
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"gateway": {"api_keys": ["from-config"]}}))
    assert _keys(_config("--config", str(path))) == ["from-config"]
    monkeypatch.setenv("SWITCHYARD_API_KEY", "from-env")
    assert _keys(_config("--config", str(path))) == ["from-env"]
    monkeypatch.delenv("SWITCHYARD_API_KEY")
    monkeypatch.setenv("SWITCHYARD_API_KEY_FILE", str(keyfile))
    assert _keys(_config("--config", str(path))) == ["key-old", "key-new"]


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--api-key", "a"], {"SWITCHYARD_API_KEY": "b"}, "--api-key, SWITCHYARD_API_KEY"),
        (
            ["--api-key-file", "KEYS"],
            {"SWITCHYARD_API_KEY_FILE": "KEYS"},
            "--api-key-file, SWITCHYARD_API_KEY_FILE",
        ),
        (["--api-key-file", "KEYS"], {"SWITCHYARD_API_KEY": "b"}, "--api-key-file, SWITCHYARD_API_KEY"),
        (["--api-key", "a", "--api-key-file", "KEYS"], {}, "--api-key, --api-key-file"),
    ],
)
def test_api_keys_given_two_ways_are_refused_naming_both(
    argv: list[str],
    env: dict[str, str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("key-in-file\n")
    monkeypatch.delenv("SWITCHYARD_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(keyfile) if value == "KEYS" else value)
    with pytest.raises(SystemExit) as exc:
        main(["serve", *[str(keyfile) if a == "KEYS" else a for a in argv]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"switchyard serve: API keys are given more than once ({named}); give one of them" in err
    assert "key-in-file" not in err


def test_a_bad_api_key_file_exits_2_naming_the_file_not_its_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty key file must not turn auth off; an unreadable one is named, never echoed."""
    monkeypatch.delenv("SWITCHYARD_API_KEY", raising=False)
    keyfile = tmp_path / "keys"
    keyfile.write_text("\n  \n")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--api-key-file", str(keyfile)])
    assert exc.value.code == 2
    assert f"the API key file {keyfile} holds no key" in capsys.readouterr().err
    keyfile.write_bytes("s\u00e9cret\n".encode())
    with pytest.raises(SystemExit):
        main(["serve", "--api-key-file", str(keyfile)])
    err = capsys.readouterr().err
    assert f"cannot read the API key file {keyfile}: not ASCII" in err and "cret" not in err
    with pytest.raises(SystemExit):
        main(["serve", "--api-key-file", str(tmp_path / "missing")])
    assert f"cannot read the API key file {tmp_path / 'missing'}: No such file" in capsys.readouterr().err


TOKEN = "internal-token-from-a-secret-0123"


def test_internal_token_from_environment_or_file_never_a_flag_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The internal token comes from SWITCHYARD_INTERNAL_TOKEN or a file (flag or
    SWITCHYARD_INTERNAL_TOKEN_FILE), which override --config; none leaves it to serve (generated)."""
    assert (_config().internal_token, _config().internal_token_file) == (None, None)
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"internal_token": "from-the-config-file-0123"}))
    monkeypatch.setenv("SWITCHYARD_INTERNAL_TOKEN", TOKEN)
    config = _config("--config", str(path))
    assert config.internal_token is not None and config.internal_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(config)
    monkeypatch.delenv("SWITCHYARD_INTERNAL_TOKEN")
    config = _config("--config", str(path), "--internal-token-file", str(tmp_path / "tok"))
    assert (config.internal_token, config.internal_token_file) == (None, tmp_path / "tok")
    monkeypatch.setenv("SWITCHYARD_INTERNAL_TOKEN_FILE", "/run/secrets/token")
    assert _config().internal_token_file == Path("/run/secrets/token")
    twice = (
        r"the internal token is given more than once \(--internal-token-file, SWITCHYARD_INTERNAL_TOKEN_FILE"
    )
    with pytest.raises(ConfigError, match=twice):
        _config("--internal-token-file", str(tmp_path / "tok"))


def test_a_bad_internal_token_exits_2_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHYARD_INTERNAL_TOKEN", "shortsecret")
    with pytest.raises(SystemExit) as exc:
        main(["serve"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "internal_token" in err and "got 11" in err and "shortsecret" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--instances", "0"], "instances"),
        (["--port", "70000"], "gateway.port"),
        (["--engine", "sim", "--model", "/x"], "engine.model"),
        (["--shutdown-grace-s", "-1"], "shutdown_grace_s"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid value stops before anything starts, with status 2 and the option's path."""
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_duplicate_pool_names_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two pools with one name would share instance ids; the config says so."""
    path = tmp_path / "serve.yaml"
    path.write_text("pools:\n  - {name: a, instances: 1}\n  - {name: a, instances: 2}\n")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(path)])
    assert exc.value.code == 2
    assert "unique" in capsys.readouterr().err


def test_unreadable_config_file_is_named(tmp_path: Path) -> None:
    """A missing or malformed --config file is reported with its path."""
    with pytest.raises(SystemExit, match="cannot read --config"):
        main(["serve", "--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(["serve", "--config", str(bad)])


def test_shutdown_grace_flag_overrides_the_config_file(tmp_path: Path) -> None:
    """How long open requests may finish on SIGTERM/SIGINT: 5 s unless the file or the flag says."""
    assert _config().shutdown_grace_s == 5.0
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"shutdown_grace_s": 20}))
    assert _config("--config", str(path)).shutdown_grace_s == 20.0
    assert _config("--config", str(path), "--shutdown-grace-s", "0.5").shutdown_grace_s == 0.5


def test_migration_and_rebalance_flags() -> None:
    """--migration loads the KV-transfer connector; --rebalance turns the rebalancer on."""
    config = _config("--migration", "--rebalance")
    assert config.engine.kv_transfer is not None
    assert config.engine.kv_transfer.ucx_tls == "tcp,self,sm"
    assert config.router.rebalancer.enabled
    assert _config().engine.kv_transfer is None


def test_slo_flag_sets_the_router_ttft_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--slo-ttft-ms is the router's TTFT SLO (2 s by default); a policy_params SLO that differs
    from it is refused before anything starts, with both values in the message."""
    assert _config().router.ttft_slo_ms == 2000
    assert _config("--slo-ttft-ms", "1500").router.ttft_slo_ms == 1500
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"router": {"policy": "dualmap", "policy_params": {"ttft_slo_ms": 1000}}}))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(path), "--slo-ttft-ms", "1500"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "router: " in err and "ttft_slo_ms=1000 ms" in err and "is 1500 ms" in err
    same = _config("--config", str(path), "--slo-ttft-ms", "1000").router
    assert (same.ttft_slo_ms, same.policy_params) == (1000, {"ttft_slo_ms": 1000})


def test_rebalance_without_migration_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """A rebalancer over vLLM engines without KV transfer could never move anything: say so."""
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--rebalance"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "kv_transfer" in err and "--migration" in err
    assert _config("--rebalance", "--engine", "sim").router.rebalancer.enabled  # the simulator needs none


def test_loopback_kv_endpoint_is_replaced_by_the_advertised_address() -> None:
    """On a cluster, tickets must name an address peers reach; loopback only works on one node."""
    from switchyard.config import EngineConfig, KvTransferConfig
    from switchyard.workers.instance_actor import with_reachable_kv_endpoint

    cfg = EngineConfig(kv_transfer=KvTransferConfig())
    moved = with_reachable_kv_endpoint(cfg, "10.1.2.3").kv_transfer
    assert moved is not None and moved.side_channel_host == "10.1.2.3"
    assert with_reachable_kv_endpoint(cfg, "127.0.0.1") == cfg
    explicit = EngineConfig(kv_transfer=KvTransferConfig(side_channel_host="10.9.9.9"))
    assert with_reachable_kv_endpoint(explicit, "10.1.2.3") == explicit
    assert with_reachable_kv_endpoint(EngineConfig(), "10.1.2.3") == EngineConfig()


def test_operator_flags_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    """`switchyard operator` options go through OperatorOptions: a bad value exits 2 naming it."""
    with pytest.raises(SystemExit) as exc:
        main(["operator", "--autoscale-interval-s", "0"])
    assert exc.value.code == 2
    assert "autoscale_interval_s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["operator", "--router-url", "http://{nope}:1"])
    assert exc.value.code == 2
    assert "router_url" in capsys.readouterr().err


def _admin_server() -> tuple[str, list[str | None], object]:
    """A real HTTP server on loopback that records each request's Authorization header."""
    import http.server
    import threading

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"moved": [], "failed": []}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", seen, server


def test_drain_sends_the_key_from_a_file_and_refuses_two_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``switchyard drain --api-key-file`` keeps the key out of ``ps``; like ``serve``, one source."""
    url, seen, server = _admin_server()
    try:
        monkeypatch.delenv("SWITCHYARD_API_KEY", raising=False)
        monkeypatch.delenv("SWITCHYARD_API_KEY_FILE", raising=False)
        keys = tmp_path / "keys"
        keys.write_text("\n  k-new  \nk-old\n")
        assert main(["drain", "w0", "--url", url, "--api-key-file", str(keys)]) == 0
        monkeypatch.setenv("SWITCHYARD_API_KEY_FILE", str(keys))
        assert main(["drain", "w0", "--url", url]) == 0
        assert seen == ["Bearer k-new", "Bearer k-new"]
        assert main(["drain", "w0", "--url", url, "--api-key", "k-flag"]) == 2
        err = capsys.readouterr().err
        assert "--api-key" in err and "SWITCHYARD_API_KEY_FILE" in err and "k-flag" not in err
        assert len(seen) == 2  # nothing was sent
    finally:
        server.shutdown()  # type: ignore[attr-defined]
