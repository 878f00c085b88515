"""``pxeserver import``: an installer ISO, tree, netboot tarball or http:// tree to a profile."""

from pxeserver.imports.importer import ImportFailed, ImportResult, run_import
from pxeserver.imports.layouts import UnknownLayout
from pxeserver.imports.sources import SourceError
from pxeserver.imports.verify import ChecksumMismatch

# Errors that end an import with one line for the user and nothing published.
IMPORT_ERRORS = (ImportFailed, UnknownLayout, SourceError, ChecksumMismatch)

__all__ = ["IMPORT_ERRORS", "ChecksumMismatch", "ImportFailed", "ImportResult", "SourceError",
           "UnknownLayout", "run_import"]
