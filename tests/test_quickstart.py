"""``python3 quickstart.py``: stdout is the command's own (``run``'s summary alone), the setup
lines and a failed install go to stderr; a run's outputs under ``data/`` are ignored by git."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def quickstart(*args: str, venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "quickstart.py"), *args],
        env={**clean, "KVID_VENV": str(venv), **env}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_run_prints_the_summary_alone_on_stdout_and_its_outputs_are_ignored_by_git(
    tmp_path: Path,
) -> None:
    """On this installed environment (its install stamp current: nothing is installed)."""
    table = tmp_path / "p.csv"
    table.write_text("prompt_id,prompt,resolution\nfox,A red fox,480p\n", encoding="utf-8")
    data = tmp_path / "data"
    done = quickstart(
        "run", "--prompts", str(table), "--data-dir", str(data), venv=Path(sys.prefix)
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["partition_key", "status"]
    assert lines[1].split()[:2] == ["fox", "COMPLETED"]
    assert lines[-2].startswith("catalog: ") and lines[-1].startswith("videos:  ")
    assert "embedded emulator" in done.stderr and "[done]" in done.stderr
    # what a run writes, were it the repository's own data/, is ignored (data/kvid.db, ...)
    written = [p.relative_to(tmp_path).as_posix() for p in data.rglob("*") if p.is_file()]
    assert {"data/kvid.db", "data/catalog/videos/data.parquet"} <= set(written), written
    assert any(path.startswith("data/videos/fox-") for path in written), written
    ignored = subprocess.run(
        ["git", "check-ignore", "--stdin"], cwd=REPO_ROOT, input="\n".join(written),
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert sorted(ignored) == sorted(written)
    kept = ["data/prompts.csv", "data/images/tiger.jpg"]
    assert subprocess.run(["git", "check-ignore", *kept], cwd=REPO_ROOT).returncode == 1


def test_the_setup_lines_and_a_failed_install_go_to_stderr(tmp_path: Path) -> None:
    """An install that cannot reach any package index: one line saying so, after pip's."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    done = quickstart(
        "run", venv=tmp_path / "venv", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty),
        PIP_CONFIG_FILE=os.devnull,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert "creating virtualenv" in done.stderr and "installing kvid-dagster" in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "quickstart: the install failed (pip exit 1; its message is above)"
    )
    assert "Traceback" not in done.stderr
