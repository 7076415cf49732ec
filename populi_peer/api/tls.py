"""TLS contexts: peers trust only the cluster CA, never the system store.

Host names are not checked (NAT and overlays change the address a peer is reached by);
the chain to the pinned cluster CA is, and the request signature names the recipient node.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_cert_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_cert_path))
    return ctx


def client_context_from_pem(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def insecure_probe_context() -> ssl.SSLContext:
    """For the first contact of ``populi join`` only: fetch the CA certificate, which the
    joiner then checks against the token's pin before trusting anything the server says.
    Nothing secret is ever sent over a connection made with this context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


__all__ = ["client_context", "client_context_from_pem", "insecure_probe_context"]
