"""``populi ca request|sign|install|show``: voters' issuer certificates, so that the cluster
root key can live off-line (ADR 0018, ``runbooks/offline-root.md``).

``request`` and ``install`` run on the voter (its issuer key is made there and never
leaves); ``sign`` runs wherever the root key is, with no agent and no network: a data
directory that still holds ``keys/cluster.key``, or ``--root-key`` and ``--ca-cert`` files
on an off-line medium.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from populi_peer.cli.common import add_data_dir, add_json, data_dir_of, print_json
from populi_peer.errors import UsageError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ca", help="issuer certificates for voters, so that the root key can live off-line"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    request = verbs.add_parser(
        "request", help="on a voter: make an issuer key here and print its signing request"
    )
    add_data_dir(request)
    request.add_argument("--out", type=Path, default=None, help="write the request to FILE")
    request.set_defaults(handler=run_request)

    sign = verbs.add_parser(
        "sign", help="where the root key is: sign a voter's issuer request (no agent needed)"
    )
    sign.add_argument("request", type=Path, metavar="REQUEST", help="the request file (PEM)")
    sign.add_argument(
        "--root-key",
        type=Path,
        default=None,
        help="the cluster root key file (default: keys/cluster.key of --data-dir)",
    )
    sign.add_argument(
        "--ca-cert",
        type=Path,
        default=None,
        help="the cluster CA certificate (default: tls/ca.crt of --data-dir)",
    )
    sign.add_argument("--for", dest="node_id", default=None, help="refuse unless for NODE_ID")
    sign.add_argument(
        "--days", type=float, default=None, help="the issuer's lifetime in days (default 365)"
    )
    sign.add_argument("--out", type=Path, default=None, help="write the certificate to FILE")
    add_data_dir(sign)
    sign.set_defaults(handler=run_sign)

    install = verbs.add_parser(
        "install", help="on the voter: install the signed issuer certificate"
    )
    install.add_argument("certificate", type=Path, metavar="CERT", help="the signed certificate")
    add_data_dir(install)
    install.set_defaults(handler=run_install)

    show = verbs.add_parser("show", help="what signs on this node, and whether the root is here")
    add_data_dir(show)
    add_json(show)
    show.set_defaults(handler=run_show)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from exc


def _write_or_print(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    sys.stderr.write(f"wrote {out}\n")


def run_request(args: argparse.Namespace) -> int:
    from populi_peer.issuers import make_request

    _write_or_print(make_request(data_dir_of(args)), args.out)
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from enrollment.ca import cert_from_pem
    from enrollment.keys import load_private_key
    from populi_peer.errors import enrollment_boundary
    from populi_peer.identity import DataPaths
    from populi_peer.issuers import sign_request

    paths = DataPaths(data_dir_of(args))
    root_key_path = args.root_key or paths.cluster_key
    ca_path = args.ca_cert or paths.ca_cert
    if not root_key_path.exists():
        raise UsageError(
            f"no root key at {root_key_path}; pass --root-key with the off-line copy "
            "(runbooks/offline-root.md)"
        )
    with enrollment_boundary():
        pem = sign_request(
            _read(args.request, "request"),
            root_key=load_private_key(root_key_path),
            ca_cert=cert_from_pem(_read(ca_path, "CA certificate")),
            now_wall_s=time.time(),
            days=365 if args.days is None else args.days,
            expected_node_id=args.node_id,
        )
    _write_or_print(pem, args.out)
    return 0


def run_install(args: argparse.Namespace) -> int:
    from enrollment.ca import node_certificate_info
    from populi_peer.errors import enrollment_boundary
    from populi_peer.issuers import install_certificate

    with enrollment_boundary():
        cert = install_certificate(
            data_dir_of(args), _read(args.certificate, "certificate"), now_wall_s=time.time()
        )
    info = node_certificate_info(cert)
    sys.stdout.write(
        f"installed the issuer of {info.principal_id} (serial {info.serial}); restart the "
        "agent to sign with it\n"
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    from populi_peer.issuers import status

    state = status(data_dir_of(args))
    if args.json:
        print_json(state.to_json())
        return 0
    lines = [f"node        {state.node_id}", f"signs with  {state.signer}"]
    if state.issuer_not_after_s is not None:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.issuer_not_after_s))
        lines.append(f"issuer      serial {state.issuer_serial}, valid until {until}")
    lines.append(f"root key    {'PRESENT on this machine' if state.root_key_present else 'absent'}")
    if state.request_pending:
        lines.append(
            "request     pending (tls/issuer.csr): have it signed, then 'populi ca install'"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
