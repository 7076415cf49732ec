"""Tests of populi_peer.gpu (helpers: gpu_variants)."""
