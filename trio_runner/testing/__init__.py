"""trio_runner.testing: fault injection, Hypothesis strategies and invariant checks.

Public, and imported by nothing else. Three parts with three import costs:

- the fault plan and :class:`FaultyRunner` run in the child and import neither
  trio nor Hypothesis; they load eagerly;
- the invariant helpers (lateness monitor, process check, outcome ledger,
  lifecycle checker) import trio; they load on first use;
- the Hypothesis strategies import Hypothesis; they load on first use.

The pytest plugin, :mod:`trio_runner.testing.pytest_plugin`, is registered
through the ``pytest11`` entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._faulty import FaultyRunner as FaultyRunner
from ._plan import NATIVE_FAULT_KINDS as NATIVE_FAULT_KINDS
from ._plan import AfterEvent as AfterEvent
from ._plan import BeforeEvent as BeforeEvent
from ._plan import CorruptFrame as CorruptFrame
from ._plan import Exit as Exit
from ._plan import Fault as Fault
from ._plan import FaultKind as FaultKind
from ._plan import FaultPlan as FaultPlan
from ._plan import Hang as Hang
from ._plan import HoldGil as HoldGil
from ._plan import HostileException as HostileException
from ._plan import HostileFault as HostileFault
from ._plan import InjectedFault as InjectedFault
from ._plan import InSetup as InSetup
from ._plan import InTeardown as InTeardown
from ._plan import OnShutdown as OnShutdown
from ._plan import OversizeFrame as OversizeFrame
from ._plan import OversizePayload as OversizePayload
from ._plan import Raise as Raise
from ._plan import Signal as Signal
from ._plan import SlowStartup as SlowStartup
from ._plan import SpawnGrandchild as SpawnGrandchild
from ._plan import StallReader as StallReader
from ._plan import StderrFlood as StderrFlood
from ._plan import Stop as Stop
from ._plan import StopHeartbeats as StopHeartbeats
from ._plan import Trigger as Trigger
from ._plan import exit_reasons as exit_reasons
from ._plan import fatal_signals as fatal_signals
from ._sequence import RequestSequence as RequestSequence
from ._sequence import Submission as Submission

if TYPE_CHECKING:
    from ._driver import run_sequence as run_sequence
    from ._invariants import LatenessMonitor as LatenessMonitor
    from ._invariants import LedgerEntry as LedgerEntry
    from ._invariants import LifecycleError as LifecycleError
    from ._invariants import Outcome as Outcome
    from ._invariants import OutcomeLedger as OutcomeLedger
    from ._invariants import check_lifecycle as check_lifecycle
    from ._invariants import descendants as descendants
    from ._invariants import leftover_processes as leftover_processes
    from ._invariants import lifecycle as lifecycle
    from ._invariants import monitor_lateness as monitor_lateness
    from ._invariants import runner_pids as runner_pids
    from ._invariants import wait_no_leftover_processes as wait_no_leftover_processes
    from ._strategies import fault_kinds as fault_kinds
    from ._strategies import fault_plans as fault_plans
    from ._strategies import faults as faults
    from ._strategies import request_sequences as request_sequences
    from ._strategies import restart_policies as restart_policies
    from ._strategies import triggers as triggers

_LAZY = {
    "LatenessMonitor": "_invariants",
    "LifecycleError": "_invariants",
    "Outcome": "_invariants",
    "OutcomeLedger": "_invariants",
    "check_lifecycle": "_invariants",
    "descendants": "_invariants",
    "leftover_processes": "_invariants",
    "monitor_lateness": "_invariants",
    "wait_no_leftover_processes": "_invariants",
    "LedgerEntry": "_invariants",
    "lifecycle": "_invariants",
    "runner_pids": "_invariants",
    "run_sequence": "_driver",
    "fault_plans": "_strategies",
    "faults": "_strategies",
    "fault_kinds": "_strategies",
    "triggers": "_strategies",
    "request_sequences": "_strategies",
    "restart_policies": "_strategies",
}


def __getattr__(name: str) -> Any:
    # The child imports this package for FaultyRunner: trio and Hypothesis load only on use.
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trio_runner.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
