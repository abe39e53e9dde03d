"""Benchmarks of the milters suite: over the milter protocol and through real Postfix."""
