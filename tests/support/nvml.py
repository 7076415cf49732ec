"""Whether this machine has NVIDIA's driver: the few tests that behave differently on a
GPU machine ask here."""

from __future__ import annotations


def nvml_present() -> bool:
    """Whether the real NVML library can talk to a driver here (it is initialised and
    shut down again)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True
