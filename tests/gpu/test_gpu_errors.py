"""The GPU errors answer as the branch of the error tree each also belongs to."""

from __future__ import annotations

import pytest

from populi_peer.errors import BadRequest, ConfigError, PopuliError
from populi_peer.gpu import AdvertisedLabelError, FixtureError, InventoryFormatError, ProbeError


@pytest.mark.parametrize(
    ("cls", "branch", "code", "exit_code", "http_status"),
    [
        (ProbeError, PopuliError, "gpu_probe_error", 125, 500),
        (FixtureError, ConfigError, "bad_gpu_fixture", 4, 400),
        (AdvertisedLabelError, ConfigError, "bad_gpu_label", 4, 400),
        (InventoryFormatError, BadRequest, "bad_gpu_inventory", 4, 400),
    ],
)
def test_each_gpu_error_has_its_code_and_its_branchs_exit_code_and_status(
    cls: type[ProbeError], branch: type[PopuliError], code: str, exit_code: int, http_status: int
) -> None:
    error = cls("broken")
    assert isinstance(error, ProbeError) and isinstance(error, branch)
    assert (error.code, error.exit_code, error.http_status) == (code, exit_code, http_status)
    assert error.to_json() == {"code": code, "message": "broken"}
