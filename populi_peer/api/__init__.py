"""The HTTP API: an ASGI app with signed-request authentication, its TLS server and the
signing peer client. Handlers live with the services that own them (``populi_peer.agent``).
"""

from populi_peer.api.app import ANY_MEMBER, ApiApp, Request, Response, Route
from populi_peer.api.auth import Authenticator, Principal

__all__ = ["ANY_MEMBER", "ApiApp", "Authenticator", "Principal", "Request", "Response", "Route"]
