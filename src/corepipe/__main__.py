"""``python -m corepipe``: the command line (cli.main) as a module."""

from corepipe.cli import main

raise SystemExit(main())
