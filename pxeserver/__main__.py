"""``python -m pxeserver``: the same as the ``pxeserver`` command."""

from pxeserver.cli import main

main()
