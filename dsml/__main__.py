"""`python -m dsml`: see dsml.cli."""

from dsml.cli import main

raise SystemExit(main())
