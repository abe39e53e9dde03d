"""Allow `python -m milters`."""

from milters.cli import main

raise SystemExit(main())
