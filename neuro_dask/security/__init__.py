"""Hardened mode: restricted unpickling, role checks and mutual TLS with role certificates."""
