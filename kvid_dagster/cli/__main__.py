"""``python -m kvid_dagster.cli``: the same as ``kvid-dagster``."""

from kvid_dagster.cli.main import main

raise SystemExit(main())
