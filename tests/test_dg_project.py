"""The README's Component path from an empty folder, run as written and offline: a venv,
``create-dagster``, the installs, ``dg scaffold``/``check``/``list``, then ``dg dev`` in the
local mode until both sample videos are materialized, then Ctrl-C.

Offline: every HTTP(S) request goes to a proxy that refuses it, so pip installs from the
machine's local mirror (hatchling and setuptools, to build the project and kvid-dagster) and
from what is already installed. Dagster is in no local mirror: the new venv sees this test's
own environment through a ``.pth`` file (pip then finds dagster, create-dagster and dg
installed), and gets the console scripts of those packages, the one step that is not in the
README. Cost: 80-95 s measured (the installs ~15 s, each ``dg`` command ~5 s, ``dg dev`` until
two videos ~30 s, its shutdown ~10 s), ~30 MB of disk for the new venv and project.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO_ROOT
from devkit import free_port, graphql_until, group_commands, kill_group, wait_group_gone

from kvid_dagster.ledger import Ledger, VideoStatus

LOCAL_MIRROR = Path("/opt/pypi/simple")  # this machine kind's local PyPI mirror
README_BLOCK = re.compile(r"### As a Component\n.*?```bash\n(.*?)```", re.DOTALL)
VIDEOS_QUERY = """
{
  assetOrError(assetKey: {path: ["kvid_videos"]}) {
    ... on Asset { assetMaterializations(limit: 10) { partition } }
  }
}
"""


def readme_commands() -> list[str]:
    found = README_BLOCK.search((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert found, "README: no bash block under '### As a Component'"
    lines = [line.strip() for line in found.group(1).splitlines() if line.strip()]
    return [line.replace("/path/to/kvid-dagster", str(REPO_ROOT)) for line in lines]


def offline_env(home: Path) -> dict[str, str]:
    """This environment without the kvid settings, a Dagster home or an active venv; the
    network closed except loopback, where the emulator and the UI are."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KVID_", "DAGSTER_HOME", "VIRTUAL_ENV", "PIP_INDEX_URL"))
    }
    refused = "http://127.0.0.1:9"
    env.update(
        HOME=str(home),  # no dg or Dagster settings of the machine's user
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HTTP_PROXY=refused, HTTPS_PROXY=refused, ALL_PROXY=refused,
        http_proxy=refused, https_proxy=refused, all_proxy=refused,
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        PIP_RETRIES="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
    )  # fmt: skip
    if LOCAL_MIRROR.is_dir():
        env["PIP_INDEX_URL"] = LOCAL_MIRROR.as_uri()
    return env


SHARE = """\
import importlib.metadata, sys
from pathlib import Path

shared, bin_dir = sys.argv[1], Path(sys.argv[2])
(Path(sys.argv[3]) / "zz_shared_test_env.pth").write_text(
    f"import site; site.addsitedir({shared!r})\\n"
)
for dist in importlib.metadata.distributions(path=[shared]):
    for ep in dist.entry_points.select(group="console_scripts"):
        script = bin_dir / ep.name
        if not script.exists():
            script.write_text(
                f"#!{bin_dir / 'python'}\\nimport sys\\n"
                "from importlib.metadata import EntryPoint\\n"
                f"sys.exit(EntryPoint({ep.name!r}, {ep.value!r}, 'console_scripts').load()())\\n"
            )
            script.chmod(0o755)
"""


def share_this_environment(folder: Path) -> str:
    """The shell line that lets the venv just made see this test's packages and scripts."""
    script = folder / "share_test_env.py"
    script.write_text(SHARE, encoding="utf-8")
    shared = sysconfig.get_paths()["purelib"]
    venv = folder / ".venv"
    target = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return f".venv/bin/python {script} {shared} {venv / 'bin'} {target / 'site-packages'}"


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_readme_path_from_an_empty_folder_to_videos_in_dg_dev(tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0].startswith("python3 -m venv .venv")
    assert commands[-1].startswith("dg dev")
    assert importlib.metadata.version("create-dagster").startswith("1.13.")
    folder = tmp_path / "empty"
    folder.mkdir()
    env = offline_env(tmp_path)
    script = "\n".join(
        ["set -euo pipefail", commands[0], share_this_environment(folder), *commands[1:-1]]
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Network error" in done.stdout + done.stderr  # create-dagster's PyPI check: offline
    project = folder / "my_videos"
    videos_defs = project / "src" / "my_videos" / "defs" / "videos"
    assert (videos_defs / "defs.yaml").is_file() and (videos_defs / "prompts.csv").is_file()
    for name in ("kvid_prompts", "kvid_video_jobs", "kvid_videos", "kvid_catalog"):
        assert name in done.stdout  # dg list defs
    assert (folder / ".venv" / "bin" / "kvid-dagster").is_file()  # installed, not shared
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "scaffolded"]):
        subprocess.run([*git, *step], cwd=project, env=env, check=True, capture_output=True)

    port = free_port()
    activate = f". {folder / '.venv' / 'bin' / 'activate'}"
    dev = subprocess.Popen(
        ["bash", "-c", f"{activate} && exec {commands[-1].split('#')[0].strip()} -p {port}"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # a process group of its own with the default SIGINT, as a terminal gives a command
        # (a test run from a background shell job would pass SIGINT on ignored)
        start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip
    try:

        def both_videos(data: dict) -> bool:
            found = (data.get("assetOrError") or {}).get("assetMaterializations") or []
            return {m["partition"] for m in found} >= {"fox", "harbour"}

        graphql_until(port, VIDEOS_QUERY, both_videos, dev, timeout=300)
        data_dir = project / ".kvid" / "videos"
        rows = Ledger(f"sqlite:///{data_dir / 'kvid.db'}").rows_by_key()
        assert {k: r.status for k, r in rows.items()} == {
            "fox": VideoStatus.COMPLETED,
            "harbour": VideoStatus.COMPLETED,
        }
        umask = os.umask(0)
        os.umask(umask)
        # videos, their previews and the catalog files: the mode of any file (not 0600)
        written = [*(data_dir / "videos").iterdir(), *(data_dir / "catalog").rglob("*.parquet")]
        assert {Path(row.video.local_path or "") for row in rows.values()} <= set(written)
        # each video's poster and its animated preview, cached beside it
        assert sorted(p.name for p in written if p.name.endswith(".webp")) == sorted(
            f".{Path(row.video.local_path or '').name}.{kind}-v1.webp"
            for row in rows.values()
            for kind in ("poster", "preview")
        )
        assert {p.name: p.stat().st_mode & 0o777 for p in written} == {
            p.name: 0o666 & ~umask for p in written
        }
        # one emulator for the code server's sensors and the run workers, in dg dev's group
        emulators = [
            pid for pid, cmd in group_commands(dev.pid).items() if "kvid_dagster.emulator" in cmd
        ]
        assert len(emulators) == 1, group_commands(dev.pid)
        assert f'"pid": {emulators[0]}' in (data_dir / "emulator" / "emulator.json").read_text()

        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C
        assert wait_group_gone(dev.pid, timeout=120) == {}
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True
        )
        assert status.stdout == ""  # .kvid/ is ignored; dg dev removed its temporary home
    finally:
        kill_group(dev)
