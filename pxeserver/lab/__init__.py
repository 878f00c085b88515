"""Labs: real boots against a throwaway pxeserver, for by-hand checks and the slow tests.

:mod:`pxeserver.lab.firmware` boots QEMU guests' firmware (SeaBIOS/OVMF, iPXE, pxelinux);
:mod:`pxeserver.lab.xen` boots a real Xen dom0 whose xl runs pypxeboot for domUs.
"""
