"""The cluster without its root key (ADR 0018), on loopback with real agents: the runbook
``runbooks/offline-root.md`` runs as written, and then tokens, joins, certificate renewals,
lifecycle changes, settings and revocations all work with the root key on no machine.
A data directory made before issuers (root-signed certificates) keeps working."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from lab.runbook import parse_runbook

from enrollment.ca import (
    cert_from_pem,
    cert_to_pem,
    chain_from_pem,
    issuer_node_id,
    make_node_certificate,
    verify_chain,
)
from enrollment.keys import load_private_key
from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from support.contract import sync_hook
from support.mesh import credential_of, meta_of
from support.procs import AgentProcess, Processes, create_token, init, join_node, populi

pytestmark = pytest.mark.e2e

RUNBOOK = Path(__file__).resolve().parents[2] / "runbooks" / "offline-root.md"


def _chain(data_dir: Path) -> list:
    return chain_from_pem((data_dir / "tls" / "node.crt").read_bytes())


class LocalRunbook:
    """The runbook's annotated blocks run in bash, each on the data directory of the host
    it names (``on=``), with the ``vars`` block first, as a reader would type them. The
    machines share one folder as the off-line medium (the stick travels)."""

    def __init__(self, tmp: Path, hosts: dict[str, Path], media: Path) -> None:
        self.steps = {step.id: step for step in parse_runbook(RUNBOOK)}
        self.vars = "\n".join(s.script for s in self.steps.values() if s.vars)
        self.hosts = hosts
        self.media = media
        self.done: list[str] = []
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "populi"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m populi_peer "$@"\n')
        wrapper.chmod(0o755)
        self.path = f"{bin_dir}:{os.environ.get('PATH', '')}"

    def run(self, step_id: str) -> str:
        step = self.steps[step_id]
        targets = tuple(self.hosts) if step.on_all else step.hosts
        output = ""
        for host in targets:
            env = {
                **os.environ,
                "PATH": self.path,
                "POPULI_DATA_DIR": str(self.hosts[host]),
                "MEDIA": str(self.media),
            }
            result = subprocess.run(
                ["bash", "-eEo", "pipefail", "-c", self.vars + "\n" + step.script],
                capture_output=True,
                text=True,
                env=env,
                timeout=step.timeout,
            )
            assert result.returncode == 0, (
                f"{RUNBOOK.name}:{step.line} step {step_id} on {host} exited "
                f"{result.returncode}: {result.stdout}{result.stderr}"
            )
            assert step.expect in result.stdout + result.stderr, (step_id, host, result.stdout)
            output += result.stdout
        self.done.append(step_id)
        return output

    def skipped(self, step_id: str) -> None:
        assert self.steps[step_id].skip, f"step {step_id} is not marked skip"
        self.done.append(step_id)

    def check_all_run(self) -> None:
        missing = [s for s, step in self.steps.items() if not step.vars and s not in self.done]
        assert not missing, f"runbook steps the test did not run: {missing}"


def test_the_offline_root_runbook_runs_as_written(tmp_path: Path, procs: Processes) -> None:
    cp, voter, media = tmp_path / "cp", tmp_path / "voter", tmp_path / "media"
    # A cluster whose root signs, as before issuers: the runbook gives cp its issuer.
    init(cp, "--root-signs")
    media.mkdir()  # the medium is mounted
    agent: AgentProcess = procs.start_agent(cp)
    first = create_token(cp)
    assert first.startswith("populi-join-2.")  # signed by the root
    join_node(first, voter, "voter")
    assert len(_chain(voter)) == 1
    book = LocalRunbook(
        tmp_path, {"cp": cp, "voter": voter, "vault": tmp_path / "vault-has-no-node"}, media
    )
    assert "signs with  root" in book.run("check")
    book.run("issue-own")
    procs.stop(agent)
    agent = procs.start_agent(cp)
    assert create_token(cp).startswith("populi-join-3.")  # now signed by cp's issuer
    book.run("move-off")
    assert not (cp / "keys" / "cluster.key").exists()
    assert (media / "cluster.key").exists()
    book.skipped("restart")
    procs.stop(agent)
    agent = procs.start_agent(cp)  # restarted: the root key is in no file and no memory
    book.run("none-left")
    book.run("token")
    book.run("voter-request")
    book.run("sign")
    assert "signs with  issuer" in book.run("voter-install")
    book.check_all_run()
    voter_issuer = cert_from_pem((voter / "tls" / "issuer.crt").read_bytes())
    assert issuer_node_id(voter_issuer) is None  # signed by the root itself

    # Without the root anywhere: a join, the joiner's agent, a renewal, lifecycle, settings.
    ca = cert_from_pem((cp / "tls" / "ca.crt").read_bytes())
    w2 = tmp_path / "w2"
    join_node(create_token(cp), w2, "w2")
    leaf, *chain = _chain(w2)
    assert len(chain) == 1 and issuer_node_id(leaf) == meta_of(cp, "node_id")
    verify_chain(leaf, chain, ca, now_wall_s=time.time(), skew_s=0)
    worker = procs.start_agent(w2)
    # w2 reaches cp over TLS: cp presents its certificate and the issuer that signed it.
    status = json.loads(populi("status", "--json", "--data-dir", str(w2), check=True).stdout)
    assert status["control_plane"]["reachable"] is True
    with httpx.Client(
        base_url=agent.url,
        transport=httpx.HTTPTransport(verify=client_context(cp / "tls" / "ca.crt"), retries=0),
        auth=SignedAuth(credential_of(w2), meta_of(cp, "node_id"), SystemClock()),
        event_hooks={"response": [sync_hook]},
        timeout=30,
    ) as client:
        answer = client.post("/v1/populi/certs/renew", json={})
    assert answer.status_code == 200, answer.text
    renewed, *renewed_chain = chain_from_pem(answer.json()["certificate"])
    verify_chain(renewed, renewed_chain, ca, now_wall_s=time.time(), skew_s=0)
    assert renewed.serial_number != leaf.serial_number
    d = ("--data-dir", str(cp))
    populi("node", "cordon", "w2", "--reason", "no root", *d, check=True)
    populi("settings", "set", "max_lease_ttl_s", "40", *d, check=True)
    populi("node", "retire", "w2", "--reason", "gone", *d, check=True)
    with sqlite3.connect(cp / "populi.db") as db:
        (text,) = db.execute(
            "SELECT text FROM revocation_lists ORDER BY serial DESC LIMIT 1"
        ).fetchone()
    assert text.startswith("populi-revocations-2.")  # signed by cp's issuer
    procs.stop(worker)


def test_a_data_dir_from_before_issuers_keeps_signing_with_its_root(
    tmp_path: Path, procs: Processes
) -> None:
    """What the previous version left: node certificates the root signed, no issuer files.
    The node signs with its root key as before (version 2 tokens, root-signed certificates),
    and its peers verify both kinds of chain."""
    cp = tmp_path / "cp"
    init(cp)
    root = load_private_key(cp / "keys" / "cluster.key")
    ca = cert_from_pem((cp / "tls" / "ca.crt").read_bytes())
    (cp / "keys" / "issuer.key").unlink()
    (cp / "tls" / "issuer.crt").unlink()
    leaf = _chain(cp)[0]
    old = make_node_certificate(
        ca_key=root,
        ca_cert=ca,
        subject_key=leaf.public_key(),  # type: ignore[arg-type]
        principal_id=meta_of(cp, "node_id"),
        cluster_id=meta_of(cp, "cluster_id"),
        addresses=["127.0.0.1"],
        now_wall_s=time.time(),
        serial=leaf.serial_number,
    )
    (cp / "tls" / "node.crt").write_bytes(cert_to_pem(old))
    procs.start_agent(cp)
    token = create_token(cp)
    assert token.startswith("populi-join-2.")
    w1 = tmp_path / "w1"
    join_node(token, w1, "w1")
    assert len(_chain(w1)) == 1 and issuer_node_id(_chain(w1)[0]) is None
    worker = procs.start_agent(w1)
    status = json.loads(populi("status", "--json", "--data-dir", str(w1), check=True).stdout)
    assert status["control_plane"]["reachable"] is True
    procs.stop(worker)
