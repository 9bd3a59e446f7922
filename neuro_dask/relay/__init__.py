"""Volunteers behind a NAT: every connection to them is one they opened (docs/distributed.md)."""
