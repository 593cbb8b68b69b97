"""Local SpeedPix emulator: API Gateway digest auth + SpeedPix backend + object storage, with faults.

``python -m airflow_provider_speedpix.emulator`` (or ``speedpix-emulator``) runs it standalone;
:class:`EmulatorServer` runs it in a background thread for tests. Options: ``docs/emulator.md``.
"""

from .app import GATEWAY_ERRORS, EmulatorConfig, create_app
from .clock import Clock, ManualClock
from .faults import AFTER_KINDS, BEFORE_KINDS, KINDS, OPERATIONS, Fault
from .png import make_png, parse_png
from .server import EmulatorServer

__all__ = [
    "AFTER_KINDS",
    "BEFORE_KINDS",
    "GATEWAY_ERRORS",
    "KINDS",
    "OPERATIONS",
    "Clock",
    "EmulatorConfig",
    "EmulatorServer",
    "Fault",
    "ManualClock",
    "create_app",
    "make_png",
    "parse_png",
]
