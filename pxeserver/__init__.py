"""pxeserver: network provisioning of Xen guests (domUs) from one registry."""

__version__ = "0.1.0"
