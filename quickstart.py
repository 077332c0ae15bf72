#!/usr/bin/env python3
"""Quick start on a machine with only Python 3.11+: creates ``.venv``, installs, then runs.

    python3 quickstart.py run     # the main job on the embedded kvid emulator
    python3 quickstart.py test    # ruff, then the test suite

Extra arguments go to the command (``python3 quickstart.py test -k catalog``). The install is
redone only when ``pyproject.toml`` changes. ``KVID_VENV`` chooses another virtualenv folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("KVID_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def say(message: str) -> None:
    """Setup lines go to stderr: stdout is the command's own (``run``'s summary alone)."""
    print(message, file=sys.stderr, flush=True)


def ensure_installed() -> None:
    """Create the virtualenv and install the project with its dev extras, once per pyproject."""
    if sys.version_info < (3, 11):
        sys.exit(f"kvid-dagster needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    stamp = VENV / ".kvid-dagster-install"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        say(f"creating virtualenv {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    say("installing kvid-dagster and its dev extras (a few minutes the first time)")
    # pip's own output goes to stderr too
    done = subprocess.run([*pip, "-e", f"{ROOT}[dev]"], stdout=sys.stderr)
    if done.returncode != 0:
        sys.exit(
            f"quickstart: the install failed (pip exit {done.returncode}; its message is above)"
        )
    stamp.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "install"}:
        print(__doc__)
        return 2
    ensure_installed()
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "install":
        return 0
    if command == "run":
        return subprocess.call([str(BIN / "kvid-dagster"), "run", *rest])
    lint = subprocess.call([str(BIN / "ruff"), "check", "."])
    tests = subprocess.call([str(BIN / "python"), "-m", "pytest", *rest])
    return tests if tests != 0 else lint


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
