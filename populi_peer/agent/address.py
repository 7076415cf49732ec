"""Where this node answers: its URL and the addresses it advertises.

The URL is known from the config until the API is bound (a listen port of 0 is only known
then); the agent sets it once it serves. Services that tell others how to reach this node
(heartbeats, join tokens, join answers, status) are given this object and read it when
they need it, so they always say what is true now.
"""

from __future__ import annotations

from collections.abc import Sequence

from populi_peer.config import Config, format_host_port, reach_host


class OwnAddress:
    def __init__(self, *, url: str, advertise: Sequence[str] = ()) -> None:
        #: ``https://host:port`` where this node's API answers.
        self.url = url
        self.advertise = tuple(advertise)

    @classmethod
    def from_config(cls, config: Config, url: str | None = None) -> OwnAddress:
        """``url``, else the first advertised address, else the listen address."""
        if url is None:
            addresses = config.advertise_addresses()
            if addresses:
                url = f"https://{addresses[0]}"
            else:
                host, port = config.listen_address()
                url = f"https://{format_host_port(reach_host(host), port)}"
        return cls(url=url, advertise=config.node.advertise)

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("https://")

    def addresses(self) -> tuple[str, ...]:
        """``host:port`` of the URL first, then the other advertised addresses."""
        address = self.host_port
        return (address, *(a for a in self.advertise if a != address))


__all__ = ["OwnAddress"]
