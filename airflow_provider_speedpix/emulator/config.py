"""The emulator's settings: one dataclass for ``create_app``, the CLI, ``EmulatorServer`` and the fixture."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock
from .faults import Fault


@dataclass
class EmulatorConfig:
    app_key: str = "emulator-key"
    app_secret: str = field(default="emulator-secret", repr=False)
    public_url: str = "http://127.0.0.1:8000"
    #: seconds from create to terminal for a task that does not wait for a worker (``sleep-<s>`` overrides)
    duration: float = 3.0
    failing_workflow_ids: set[str] = field(default_factory=lambda: {"wf-fail"})
    missing_workflow_ids: set[str] = field(default_factory=lambda: {"wf-missing"})
    #: workflows published without custom output fields: images only in ``data.images``, ``result`` empty
    images_only_workflow_ids: set[str] = field(default_factory=lambda: {"wf-images-only"})
    timestamp_window_s: float = 900.0
    upload_url_ttl_s: float = 3600.0
    storage_dir: str | None = None
    faults: list[Fault] = field(default_factory=list)
    #: tasks that run at once; the rest wait in FIFO order (None or 0: unlimited)
    capacity: int | None = None
    #: ``etaRelative`` / ``estimatedDurationInSeconds`` wrong by a factor in [1 - eta_error, 1 + eta_error]
    eta_error: float = 0.0
    #: ... and always off by this share on top (0.5: estimates 50 % too long; negative: too short)
    eta_bias: float = 0.0
    #: seed of the per-task estimate errors (the same seed and the same creates give the same errors)
    seed: int = 0
    #: private resource pools that are over their utilisation limit
    full_pool_ids: set[str] = field(default_factory=set)
    #: seconds added to every signed API call before it is answered (a service far away); other calls
    #: are waited out concurrently, as network latency would be
    latency: float = 0.0
    #: time for every part of the emulator; :class:`~.clock.ManualClock` in tests
    clock: Clock = field(default_factory=Clock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.capacity is not None:
            self.capacity = int(self.capacity) or None
            if self.capacity is not None and self.capacity < 0:
                raise ValueError("capacity must be >= 0 (0: unlimited)")
        for name in ("duration", "eta_error", "timestamp_window_s", "upload_url_ttl_s", "latency"):
            setattr(self, name, _non_negative(name, getattr(self, name)))
        self.eta_bias = _bias(self.eta_bias)


#: changeable at runtime (``POST /_emulator/config``); reset restores their start values
RUNTIME_SETTINGS = (
    "duration",
    "failing_workflow_ids",
    "missing_workflow_ids",
    "images_only_workflow_ids",
    "full_pool_ids",
    "timestamp_window_s",
    "upload_url_ttl_s",
    "eta_error",
    "eta_bias",
    "latency",
)
#: shown by ``GET /_emulator/config`` but fixed for the server's life
FIXED_SETTINGS = ("public_url", "app_key", "capacity", "seed")


def copy_value(value: Any) -> Any:
    return set(value) if isinstance(value, set) else value


def parse_runtime_changes(changes: Any) -> dict[str, Any]:
    """Validate a ``POST /_emulator/config`` body; raise ``ValueError`` with the reason."""
    if not isinstance(changes, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(changes) - set(RUNTIME_SETTINGS)
    if unknown:
        raise ValueError(f"not changeable at runtime: {', '.join(sorted(unknown))}")
    parsed: dict[str, Any] = {}
    for name, value in changes.items():
        if name.endswith("_ids"):
            if not isinstance(value, list | tuple | set):
                raise ValueError(f"{name} must be a list")
            parsed[name] = {str(v) for v in value}
        elif name == "eta_bias":
            parsed[name] = _bias(value)
        else:
            parsed[name] = _non_negative(name, value)
    return parsed


def _non_negative(name: str, value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a non-negative number")
    return number


def _bias(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= -1:
        raise ValueError("eta_bias must be a number above -1")
    return number
