"""Pure protocol logic: no trio, sockets, clocks or global random.

Time comes in as ``now_wall`` / ``now_mono`` arguments, randomness as an ``rng`` argument.
"""

__all__: list[str] = []
