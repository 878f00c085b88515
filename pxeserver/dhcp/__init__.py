"""The DHCP service (full and proxyDHCP modes): codec, responder, leases and server.

Empty on purpose: pypxeboot imports the codec alone in dom0, without the server behind it.
"""
