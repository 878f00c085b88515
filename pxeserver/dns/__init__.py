"""DNS for the provisioned hosts: an authoritative zone served live from the registry.

``DnsService`` (service.py) owns the sockets, ``Resolver`` (resolver.py) turns query bytes into
reply bytes, ``Zone`` (zone.py) holds the names, ``Forwarder`` (forward.py) asks an upstream for
everything else. Records are parsed and built with dnslib; the hot path is hand-written.
"""

from pxeserver.dns.service import DnsService

__all__ = ["DnsService"]
