"""The cluster key sealed to one voter's request (``enrollment/keyshare.py``, ADR 0016)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.errors import CertificateError
from enrollment.keyshare import new_request_key, open_cluster_key, seal_cluster_key

CLUSTER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CONTEXT = {"cluster_id": "home", "sender": "n-leader", "receiver": "n-voter"}


def test_a_share_opens_with_its_request_key_to_the_cluster_key() -> None:
    request_key, public = new_request_key()
    share = seal_cluster_key(CLUSTER, receiver_public=public, **CONTEXT)
    opened = open_cluster_key(
        share, request_key=request_key, expected_public=CLUSTER.public_key(), **CONTEXT
    )
    assert opened.private_bytes_raw() == CLUSTER.private_bytes_raw()


@pytest.mark.parametrize(
    "change",
    [
        {"receiver": "n-other"},  # sealed to another voter's request
        {"cluster_id": "elsewhere"},  # another cluster
        {"sender": "n-impostor"},  # not from the leader asked
    ],
)
def test_a_share_does_not_open_out_of_its_context(change: dict[str, str]) -> None:
    request_key, public = new_request_key()
    share = seal_cluster_key(CLUSTER, receiver_public=public, **CONTEXT)
    with pytest.raises(CertificateError) as refused:
        open_cluster_key(
            share,
            request_key=request_key,
            expected_public=CLUSTER.public_key(),
            **{**CONTEXT, **change},
        )
    assert refused.value.code == "key_share_bad"


def test_a_tampered_share_or_another_key_is_refused() -> None:
    request_key, public = new_request_key()
    share = seal_cluster_key(CLUSTER, receiver_public=public, **CONTEXT)
    flipped = share.sealed[:-2] + ("A" if share.sealed[-2] != "A" else "B") + share.sealed[-1]
    with pytest.raises(CertificateError):
        open_cluster_key(
            replace(share, sealed=flipped),
            request_key=request_key,
            expected_public=CLUSTER.public_key(),
            **CONTEXT,
        )
    other = Ed25519PrivateKey.generate()
    share = seal_cluster_key(other, receiver_public=public, **CONTEXT)
    with pytest.raises(CertificateError) as refused:
        open_cluster_key(
            share, request_key=request_key, expected_public=CLUSTER.public_key(), **CONTEXT
        )
    assert "not the cluster's key" in str(refused.value)
    with pytest.raises(CertificateError):
        seal_cluster_key(CLUSTER, receiver_public="not-base64!", **CONTEXT)
