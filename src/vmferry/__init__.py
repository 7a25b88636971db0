"""vmferry: live migration of QEMU virtual machines."""

__version__ = "0.1.0"
