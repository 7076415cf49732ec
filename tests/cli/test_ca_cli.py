"""``populi ca request|sign|install|show`` (ADR 0018): no agent, files only; every refusal
one line, exit 4, and nothing installed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from enrollment.ca import cert_from_pem, chain_from_pem, issuer_node_id
from populi_peer.cli.main import main


def _populi(*args: str) -> int:
    return main(list(args))


def _init(tmp_path: Path, name: str, *extra: str) -> Path:
    data_dir = tmp_path / name
    assert (
        _populi(
            "init",
            "--cluster-name",
            name,
            "--data-dir",
            str(data_dir),
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            *extra,
        )
        == 0
    )
    return data_dir


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert _populi(*args) == 4
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    return err


def test_init_makes_an_issuer_that_signs_its_own_certificate(tmp_path: Path) -> None:
    data_dir = _init(tmp_path, "a")
    leaf, issuer = chain_from_pem((data_dir / "tls" / "node.crt").read_bytes())
    assert issuer == cert_from_pem((data_dir / "tls" / "issuer.crt").read_bytes())
    assert issuer_node_id(leaf) is not None
    root_signed = _init(tmp_path, "b", "--root-signs")
    assert len(chain_from_pem((root_signed / "tls" / "node.crt").read_bytes())) == 1
    assert not (root_signed / "tls" / "issuer.crt").exists()


def test_request_sign_install_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = _init(tmp_path, "a", "--root-signs")
    request, cert = tmp_path / "request.pem", tmp_path / "issuer.crt"
    d = ("--data-dir", str(data_dir))
    assert _populi("ca", "request", *d, "--out", str(request)) == 0
    assert (data_dir / "keys" / "issuer.next.key").exists()
    assert _populi("ca", "sign", str(request), *d, "--out", str(cert), "--days", "30") == 0
    capsys.readouterr()
    assert _populi("ca", "show", *d, "--json") == 0
    assert json.loads(capsys.readouterr().out)["signer"] == "root"
    assert _populi("ca", "install", str(cert), *d) == 0
    assert not (data_dir / "keys" / "issuer.next.key").exists()
    capsys.readouterr()
    assert _populi("ca", "show", *d, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["signer"] == "issuer" and shown["root_key_present"] is True
    assert shown["issuer"]["not_after_s"] < time.time() + 31 * 86400


def test_refusals_are_one_line_and_install_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _init(tmp_path, "a", "--root-signs"), _init(tmp_path, "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    assert "not a PEM certificate request" in _refused(
        capsys, "ca", "sign", str(junk), "--data-dir", str(a)
    )
    request_b, cert_b = tmp_path / "b.pem", tmp_path / "b.crt"
    assert _populi("ca", "request", "--data-dir", str(b), "--out", str(request_b)) == 0
    # Another cluster's root refuses b's request; b's own root signs it, and a refuses it.
    assert "not this root's" in _refused(capsys, "ca", "sign", str(request_b), "--data-dir", str(a))
    assert _populi("ca", "sign", str(request_b), "--data-dir", str(b), "--out", str(cert_b)) == 0
    request_a = tmp_path / "a.pem"
    assert _populi("ca", "request", "--data-dir", str(a), "--out", str(request_a)) == 0
    assert "not signed by this cluster's root" in _refused(
        capsys, "ca", "install", str(cert_b), "--data-dir", str(a)
    )
    assert not (a / "tls" / "issuer.crt").exists()
    assert "not n-aaaaaaaaaaaaaaaa" in _refused(
        capsys, "ca", "sign", str(request_a), "--data-dir", str(a), "--for", "n-aaaaaaaaaaaaaaaa"
    )
