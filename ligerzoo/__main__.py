"""`python -m ligerzoo ...`: the `ligerzoo` command (ligerzoo/cli.py)."""

from ligerzoo.cli import main

raise SystemExit(main())
