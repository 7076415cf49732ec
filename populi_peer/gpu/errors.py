"""Errors of the GPU package, a subtree of :class:`populi_peer.errors.PopuliError`.

A missing driver, a refused NVML query or a hung NVML call is *not* an error: it makes a
CPU-only node or an unknown field (see ``docs/gpu-health.md``). What is left is input that
someone gave us and got wrong::

    ProbeError                    base of this subtree (code ``gpu_probe_error``)
    ├── FixtureError              a replay fixture (capture or sequence) is unreadable or
    │                             invalid; also a ConfigError (exit 4): whoever set
    │                             ``[gpu] fixture`` / ``POPULI_GPU_FIXTURE`` must fix it
    ├── AdvertisedLabelError      a ``[gpu.labels]`` value is invalid (``count`` not a
    │                             non-negative integer); also a ConfigError
    └── InventoryFormatError      a GPU inventory payload from the wire has the wrong shape;
                                  also a BadRequest (HTTP 400): the sender must fix it

Every message names the offending file, step, key or field.
"""

from __future__ import annotations

from populi_peer.errors import BadRequest, ConfigError, PopuliError


class ProbeError(PopuliError):
    code = "gpu_probe_error"


class FixtureError(ProbeError, ConfigError):
    code = "bad_gpu_fixture"


class AdvertisedLabelError(ProbeError, ConfigError):
    code = "bad_gpu_label"


class InventoryFormatError(ProbeError, BadRequest):
    code = "bad_gpu_inventory"


__all__ = ["AdvertisedLabelError", "FixtureError", "InventoryFormatError", "ProbeError"]
