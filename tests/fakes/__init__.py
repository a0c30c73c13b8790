"""Test doubles that are real servers (fake engines on 127.0.0.1), shared with bench/."""
