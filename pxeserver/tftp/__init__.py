"""pxeserver's read-only TFTP service; see server.py for the design."""

from pxeserver.tftp.server import TftpService

__all__ = ["TftpService"]
