"""The DHCP service (full and proxyDHCP modes); see codec, responder, leases and server."""

from pxeserver.dhcp.server import DhcpService

__all__ = ["DhcpService"]
