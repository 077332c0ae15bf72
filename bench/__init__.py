"""The kvid-dagster benchmark suite: ``.venv/bin/python bench/run.py [--quick]``.

Each yardstick is a module run in its own process (``python -m bench.<module> --out F.json``) so
that its peak memory is its own; ``bench/run.py`` runs them in turn, prints the table and writes
the JSON.
"""
