"""egress-auth: an egress proxy that injects credentials so sandboxes never hold secrets."""

__version__ = "0.1.0"
