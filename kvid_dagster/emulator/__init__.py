"""The local kvid emulator: a real HTTP server implementing the kvid contract, both dialects.

>>> with KvidEmulator(EmulatorConfig(job_duration=0.5)) as emu:  # doctest: +SKIP
...     emu.base_url
'http://127.0.0.1:40123'

It imports nothing from ``kvid_dagster.client`` (nor Dagster): it restates the contract on its
own, so the client and the emulator check each other.
"""

from kvid_dagster.emulator.config import EmulatorConfig
from kvid_dagster.emulator.faults import FAULT_KINDS, Fault
from kvid_dagster.emulator.generation import ErrorCode
from kvid_dagster.emulator.render import Defect
from kvid_dagster.emulator.server import FAIL_MARKER, JobInfo, KvidEmulator
from kvid_dagster.emulator.validation import EmulatedDialect

__all__ = [
    "FAIL_MARKER",
    "FAULT_KINDS",
    "Defect",
    "EmulatedDialect",
    "EmulatorConfig",
    "ErrorCode",
    "Fault",
    "JobInfo",
    "KvidEmulator",
]
