"""Helpers shared by the test tiers (process management, ports)."""
