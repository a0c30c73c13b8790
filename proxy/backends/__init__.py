"""Backends: where tokens come from. Every one implements `proxy.backends.base.Backend`."""
