"""The `milters` command (placeholder, being written)."""


def main() -> int:
    return 0
