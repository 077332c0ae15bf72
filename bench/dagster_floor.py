"""Dagster's own floor on this machine: what one run costs to start, whatever it does.

- ``import dagster`` in a fresh interpreter;
- an in-process ``execute_in_process`` of a trivial, dynamically partitioned asset job on a
  SQLite instance (the first run, then the median of the next ones): the cost of a run per
  partition when runs share a process;
- ``dagster asset materialize`` of one partition of the same asset as a subprocess (the CLI's
  default multiprocess executor): the cost of a run per partition when each run is a process,
  as under a run launcher that starts one process per run.

The figures per partition are then extrapolated to N partitions by ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import phase_args, quiet_dagster, scratch, write_result

TRIVIAL_DEFS = """
import dagster as dg

parts = dg.DynamicPartitionsDefinition(name="floor_parts")


@dg.asset(partitions_def=parts)
def trivial(context: dg.AssetExecutionContext) -> int:
    return len(context.partition_key)


defs = dg.Definitions(assets=[trivial], jobs=[dg.define_asset_job("trivial_job", [trivial])])
"""


def import_dagster_s() -> float:
    code = "import time; t = time.perf_counter(); import dagster; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--runs", type=int, default=None, help="in-process runs (default 6)")
        parser.add_argument("--cli-runs", type=int, default=None, help="CLI runs (default 2)")

    args = phase_args(__doc__.splitlines()[0], add)
    runs = args.runs or (3 if args.quick else 6)
    cli_runs = args.cli_runs if args.cli_runs is not None else (1 if args.quick else 2)
    quiet_dagster()
    with scratch(args.workdir, "kvid-bench-floor-") as tmp:
        imports = [import_dagster_s() for _ in range(1 if args.quick else 3)]

        defs_file = tmp / "floor_defs.py"
        defs_file.write_text(TRIVIAL_DEFS, encoding="utf-8")
        home = tmp / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
        keys = [f"p{i}" for i in range(runs + cli_runs)]

        sys.path.insert(0, str(tmp))
        import floor_defs  # type: ignore[import-not-found]
        from dagster import DagsterInstance

        instance = DagsterInstance.from_config(str(home))
        instance.add_dynamic_partitions("floor_parts", keys)
        job = floor_defs.defs.resolve_job_def("trivial_job")
        quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        in_process: list[float] = []
        for key in keys[:runs]:
            t0 = time.perf_counter()
            result = job.execute_in_process(instance=instance, partition_key=key, run_config=quiet)
            in_process.append(time.perf_counter() - t0)
            assert result.success
        instance.dispose()

        cli: list[float] = []
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        exe = Path(sys.executable).with_name("dagster")
        for key in keys[runs:]:
            t0 = time.perf_counter()
            subprocess.run(
                [str(exe), "asset", "materialize", "-f", str(defs_file), "--select", "trivial",
                 "--partition", key],
                env=env, cwd=tmp, capture_output=True, text=True, check=True,
            )  # fmt: skip
            cli.append(time.perf_counter() - t0)

    write_result(
        args.out,
        {
            "import_dagster_s": statistics.median(imports),
            "in_process_first_run_s": in_process[0],
            "in_process_run_s": statistics.median(in_process[1:] or in_process),
            "in_process_runs": len(in_process),
            "cli_run_s": statistics.median(cli) if cli else None,
            "cli_runs": len(cli),
            "cpus": os.cpu_count(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
