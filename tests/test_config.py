from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from populi_peer.config import (
    Config,
    apply_mapping,
    env_key_path,
    example_toml,
    iter_keys,
    load_config,
)
from populi_peer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_misspelled_key_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[gpu]\nrefresh_ss = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(data_dir=None, config_file=path, environ={})
    message = str(info.value)
    assert "gpu.refresh_ss" in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text,key",
    [
        ('[gpu]\nrefresh_s = "fast"\n', "gpu.refresh_s"),
        ("[exec]\nremote = 1\n", "exec.remote"),
        ("[api]\nmax_body_bytes = 1.5\n", "api.max_body_bytes"),
        ("[api]\nmax_body_bytes = -1\n", "api.max_body_bytes"),
        ('[log]\nformat = "xml"\n', "log.format"),
        ('[scope]\noverlay_cidrs = ["10.8.0.0/33"]\n', "scope.overlay_cidrs"),
        ('[node]\nlisten = "nowhere:99999"\n', "node.listen"),
        ('[node]\nname = "Bad_Name"\n', "node.name"),
        ('[node]\nname = "node-1\\n"\n', "node.name"),  # a trailing newline is no name
        ("gpu = 3\n", "gpu"),
        ("[timings.lan]\nstale_after_s = 0.5\n", "timings.lan.stale_after_s"),
        ("[exec]\nstop_margin_s = 1.0\n", "exec.stop_margin_s"),
        ("[gpu.labels]\nmodel = 4090\n", "gpu.labels.model"),
    ],
)
def test_wrong_type_or_impossible_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(data_dir=None, config_file=path, environ={})
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[gpu\n")
    with pytest.raises(ConfigError) as info:
        load_config(data_dir=None, config_file=path, environ={})
    assert str(path) in str(info.value)


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "populi.toml").write_text(
        '[node]\nname = "from-data-dir"\nlisten = "127.0.0.1:1"\n'
    )
    path = _write(tmp_path, '[node]\nlisten = "127.0.0.1:2"\n[gpu]\nrefresh_s = 7\n')
    environ = {"POPULI_GPU__REFRESH_S": "8", "POPULI_NODE__LISTEN": "127.0.0.1:3"}
    config = load_config(
        data_dir=data_dir,
        config_file=path,
        environ=environ,
        overrides={"node.listen": "127.0.0.1:4"},
    )
    assert config.node.name == "from-data-dir"
    assert config.gpu.refresh_s == 8.0
    assert config.node.listen == "127.0.0.1:4"


def test_env_mapping_is_unambiguous_for_nested_tables_and_underscores() -> None:
    assert env_key_path("POPULI_GPU__REFRESH_S") == "gpu.refresh_s"
    assert env_key_path("POPULI_TIMINGS__OVERLAY__STALE_AFTER_S") == "timings.overlay.stale_after_s"
    assert env_key_path("POPULI_GPU__LABELS__MODEL") == "gpu.labels.model"
    assert env_key_path("POPULI_EXEC_REMOTE") == "exec.remote"
    assert env_key_path("POPULI_GPU_FIXTURE") == "gpu.fixture"
    assert env_key_path("POPULI_SOMETHING") is None
    config = load_config(
        data_dir=None,
        config_file=None,
        environ={
            "POPULI_TIMINGS__OVERLAY__STALE_AFTER_S": "20",
            "POPULI_EXEC_REMOTE": "0",
            "POPULI_GPU__LABELS__MODEL": "RTX 4090",
            "POPULI_SCOPE__OVERLAY_CIDRS": "10.8.0.0/24, 10.9.0.0/24",
        },
    )
    assert config.timings.overlay.stale_after_s == 20.0
    assert config.exec.remote is False
    assert config.gpu.labels == {"model": "RTX 4090"}
    assert config.scope.overlay_cidrs == ["10.8.0.0/24", "10.9.0.0/24"]


def test_every_config_key_is_reachable_from_the_environment() -> None:
    for key, _tp, _meta in iter_keys():
        name = "POPULI_" + key.upper().replace(".", "__")
        assert env_key_path(name) == key


def test_unknown_variable_warns_and_reserved_task_names_do_not() -> None:
    warnings: list[str] = []
    load_config(
        data_dir=None,
        config_file=None,
        environ={
            "POPULI_TASK_ID": "t",
            "POPULI_ATTEMPT": "1",
            "POPULI_FENCING_TOKEN": "1.2",
            "POPULI_DATA_DIR": "/x",
            "POPULI_GPU__NOPE": "1",
            "POPULI_TYPO": "1",
        },
        warn=warnings.append,
    )
    assert len(warnings) == 2
    assert any("POPULI_GPU__NOPE" in w for w in warnings)
    assert any("POPULI_TYPO" in w for w in warnings)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data_dir=None, config_file=None, environ={"POPULI_EXEC_REMOTE": "maybe"})
    assert "POPULI_EXEC_REMOTE" in str(info.value)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.gpu = None  # type: ignore[misc]


def test_example_file_documents_every_key_and_matches_the_code() -> None:
    path = ROOT / "configs" / "populi.example.toml"
    text = path.read_text()
    assert text == example_toml(), (
        "regenerate with: python -m populi_peer.config > configs/populi.example.toml"
    )
    parsed = apply_mapping(Config(), tomllib.loads(text), source=str(path))
    assert parsed == Config()
    for key, _tp, meta in iter_keys():
        assert meta["doc"], key
        assert key.rpartition(".")[2] in text


def test_the_stop_margin_rule_is_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety rule 3's floor lives once, in ``core.leases.validate_stop_margin``: the config
    (before the cluster's TTL is known) and the worker (for a lease's TTL) call it; exec
    keeps no copy."""
    import populi_peer.exec as exec_pkg
    from populi_peer import config as config_module
    from populi_peer.core import leases

    calls: list[float | None] = []

    def spy(margin: float, **kwargs: object) -> None:
        calls.append(kwargs["ttl_s"])  # type: ignore[arg-type]
        leases.validate_stop_margin(margin, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(config_module, "validate_stop_margin", spy)
    load_config(
        data_dir=None, config_file=_write(tmp_path, "[exec]\nstop_margin_s = 7.0\n"), environ={}
    )
    assert calls == [None]
    Config().exec.check_stop_margin(30.0)
    assert calls == [None, 30.0]
    assert not hasattr(exec_pkg, "min_stop_margin_s")
    # No sum of its own (the documentation of the key says the rule in words).
    source = Path(config_module.__file__).read_text()
    assert not re.search(r"\.kill_grace_s\s*\+|\+\s*\w+\.kill_latency_s", source)
