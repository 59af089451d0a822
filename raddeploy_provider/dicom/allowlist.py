"""Which DICOM nodes are known to this deployment: the listener's allow-list, one reading.

The listener refuses an association from an address or calling AE title not on it; the send
task returns results to a study's sender only when that sender is on it (a node that could
not have sent the study must not receive its results). Both read the rule here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowList:
    """``calling``: AE titles (empty: any); ``networks``: addresses or CIDR blocks (empty: any)."""

    calling: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, calling: tuple[str, ...] | list[str], networks: tuple[str, ...] | list[str]) -> AllowList:
        """From the settings' text (``RADDEPLOY_ALLOWED_CALLING_AETS``, ``RADDEPLOY_ALLOWED_NETWORKS``)."""
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        except ValueError as exc:
            raise ValueError(f"RADDEPLOY_ALLOWED_NETWORKS: {exc} (write addresses or CIDR blocks, "
                             "comma-separated: 10.0.0.0/8,192.168.1.20)") from None
        return cls(frozenset(calling), nets)

    @property
    def configured(self) -> bool:
        """Whether anything is restricted at all (else every node may send)."""
        return bool(self.calling or self.networks)

    def address_refusal(self, address: str) -> str | None:
        """Why ``address`` (an IP address) is not allowed, or None."""
        if not self.networks:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return f"address {address!r} is not an IP address"
        if any(ip in net for net in self.networks):
            return None
        return f"address {address} is not in RADDEPLOY_ALLOWED_NETWORKS"

    def calling_refusal(self, calling: str) -> str | None:
        """Why calling AE title ``calling`` is not allowed, or None."""
        if self.calling and calling not in self.calling:
            return f"calling AE title {calling!r} is not allowed"
        return None

    def refusal(self, calling: str, address: str) -> str | None:
        """Why a node (calling AE title, address) is not on the list, or None."""
        return self.address_refusal(address) or self.calling_refusal(calling)
