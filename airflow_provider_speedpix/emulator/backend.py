"""The SpeedPix backend: ``comfy_prompt``, ``comfy_get_progress``, ``comfy_get_result`` and the task lifecycle.

Lifecycle (all times from the injected :class:`~.clock.Clock`, so tests move time instead of sleeping).
A task of duration ``D`` (``duration``, or ``<s>`` for workflow id ``sleep-<s>``) needs one worker slot.
Slots are handed out in FIFO order of creation; with ``capacity`` unlimited every task gets one at once.
After getting its slot the task still waits for the rest of its dispatch time (the first 10 % of ``D``
after creation), then runs for the other 90 %. So with free capacity a task is ``waiting`` for 0.1·D and
``running`` for 0.9·D, exactly as before queueing existed; behind a full queue it waits until a slot
frees, then runs at once when it already waited out its dispatch time.

Because durations are known when a task is created, the whole schedule is computed then (a heap of slot
free times): queue positions and timings are exact, and every status call is O(log n).

On the wire (see ``docs/emulator.md``): ``progress`` is a fraction 0..1; ``lastQueueRemaining`` (tasks
ahead still without a slot) while ``waiting``; ``state`` = ``{"node", "nodeIndex", "nodeCount", "step",
"steps"}`` while ``running``; ``etaRelative`` / ``estimatedDurationInSeconds`` are doubles, wrong by the
task's drawn estimate error; the result carries ``taskDuration`` (ms of running) and ``taskBeginTime`` /
``taskEndTime`` (13-digit epoch ms).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock
from .config import EmulatorConfig
from .storage import OUTPUT_URL_TTL_S, sign_output
from .wire import envelope, envelope_error, invalid_parameter

#: share of a task's duration spent waiting for dispatch before it runs
DISPATCH_SHARE = 0.1
#: the sample workflow's nodes: (label, steps, share of the running time)
NODES = (
    ("LoadImage", 1, 0.05),
    ("CLIPTextEncode", 1, 0.05),
    ("KSampler", 20, 0.78),
    ("VAEDecode", 1, 0.08),
    ("SaveImage", 1, 0.04),
)
SHARED_POOL = "default"
#: ``data.images`` of a workflow without custom output fields (ComfyUI's default file names)
DEFAULT_IMAGE_NAMES = ("ComfyUI_00001_", "ComfyUI_00002_")
TEMP_FILE_NAMES = ("subject_image", "mask_image")


@dataclass
class Task:
    task_id: str
    workflow_id: str
    seq: int
    created: float  # monotonic
    created_wall: float  # epoch seconds at ``created``
    duration: float
    acquired: float  # got a worker slot (monotonic)
    begin: float  # starts running
    end: float  # terminal
    eta_factor: float
    inputs: dict
    return_temp_files: bool
    failing: bool
    images_only: bool = False
    alias_id: str | None = None
    version_id: str | None = None
    resource_config_id: str | None = None  # the header as sent
    pool: str = SHARED_POOL  # the pool it runs on
    #: signed output URLs handed out, per variant, reused until they expire: (url, expires)
    signed_urls: dict[str, tuple[str, int]] = field(default_factory=dict)

    def status(self, now: float) -> str:
        if now >= self.end:
            return "failed" if self.failing else "succeeded"
        return "running" if now >= self.begin else "waiting"

    def fraction(self, now: float) -> float:
        """Share of the running time done (0 before, 1 after)."""
        if now >= self.end:
            return 1.0
        if now <= self.begin:
            return 0.0
        return (now - self.begin) / (self.end - self.begin)

    def wall_ms(self, monotonic: float) -> int:
        return round((self.created_wall + (monotonic - self.created)) * 1000)

    def output_names(self) -> tuple[str, ...]:
        if self.images_only:
            return DEFAULT_IMAGE_NAMES
        return ("output", *TEMP_FILE_NAMES) if self.return_temp_files else ("output",)


def node_state(fraction: float) -> dict[str, Any]:
    """Which node runs at ``fraction`` of the running time, and its step."""
    start = 0.0
    for index, (label, steps, share) in enumerate(NODES):
        if fraction < start + share or index == len(NODES) - 1:
            inside = min(1.0, max(0.0, (fraction - start) / share))
            step = min(steps, int(inside * steps) + 1)
            return {
                "node": label,
                "nodeIndex": index + 1,
                "nodeCount": len(NODES),
                "step": step,
                "steps": steps,
            }
        start += share
    raise AssertionError("unreachable")


def choose_pool(header: str | None, full: set[str]) -> str | None:
    """The pool a create runs on, or None when every pool it names is private and full.

    ``a,b`` tries the private pools in order (the emulator has no utilisation figures, so "least
    utilised first" is list order); ``default`` is the shared pool and never full.
    """
    names = [name.strip() for name in (header or "").split(",") if name.strip()] or [SHARED_POOL]
    for name in names:
        if name == SHARED_POOL or name not in full:
            return name
    return None


class Backend:
    def __init__(self, config: EmulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.predictions = 0
        self._slots: list[float] = []  # heap: when each busy worker slot frees
        self._acquired: list[float] = []  # by creation order; never decreases
        self._rng = random.Random(self.config.seed)  # noqa: S311 - simulated estimate errors, not security

    # -- scheduling ------------------------------------------------------------------------------------

    def _schedule(self, now: float, duration: float) -> tuple[float, float, float]:
        """(acquired, begin, end) of a task created ``now``; books its slot."""
        capacity = self.config.capacity
        acquired = now
        if capacity is not None and len(self._slots) >= capacity:
            acquired = max(now, heapq.heappop(self._slots))
        begin = max(acquired, now + DISPATCH_SHARE * duration)
        end = begin + (1 - DISPATCH_SHARE) * duration
        if capacity is not None:
            heapq.heappush(self._slots, end)
        self._acquired.append(acquired)
        return acquired, begin, end

    def queue_ahead(self, task: Task, now: float) -> int:
        """Tasks created before ``task`` that still have no slot at ``now`` (0 once it has one)."""
        if task.acquired <= now:
            return 0
        return task.seq - bisect.bisect_right(self._acquired, now, 0, task.seq)

    def _eta_factor(self) -> float:
        error = self._rng.uniform(-self.config.eta_error, self.config.eta_error)
        return max(0.0, 1.0 + self.config.eta_bias + error)

    def task_duration(self, workflow_id: str) -> float:
        if workflow_id.startswith("sleep-"):
            try:
                value = float(workflow_id[len("sleep-") :])
                if math.isfinite(value) and value >= 0:
                    return value
            except ValueError:
                pass
        return float(self.config.duration)

    def output_url(self, task_id: str, variant: str = "output") -> str:
        """A pre-signed URL (``?Expires=..&Signature=..``), valid for ``OUTPUT_URL_TTL_S`` seconds, as OSS
        hands out for private buckets; the same URL again until it expires."""
        task = self.tasks.get(task_id)
        now = self.clock.time()
        cached = task.signed_urls.get(variant) if task is not None else None
        if cached is not None and now < cached[1] - 60:
            return cached[0]
        key = f"outputs/{task_id}/{variant}.png"
        expires = int(now + OUTPUT_URL_TTL_S)
        url = f"{self.config.public_url}/_emulator/files/{key}?Expires={expires}&Signature="
        url += sign_output(self.config, key, expires)
        if task is not None:
            task.signed_urls[variant] = (url, expires)
        return url

    def output_available(self, task_id: str, variant: str) -> Task | None:
        """The task whose output ``variant`` can be served now, else None."""
        task = self.tasks.get(task_id)
        now = self.clock.monotonic()
        if task is not None and task.status(now) == "succeeded" and variant in task.output_names():
            return task
        return None

    # -- operations ------------------------------------------------------------------------------------

    def create(self, body: dict, headers: Mapping[str, str]) -> dict:
        workflow_id = body.get("workflow_id")
        if not isinstance(workflow_id, str) or not workflow_id.strip():
            return invalid_parameter("workflow_id is required")
        inputs = body.get("inputs")
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, dict):
            return invalid_parameter("inputs must be a JSON object")
        config = self.config
        if workflow_id in config.missing_workflow_ids:
            return envelope_error(
                "WorkflowNotFound", f"workflow {workflow_id} not found", "WORKFLOW_NOT_FOUND"
            )
        header = headers.get("x-sp-resource-config-id")
        pool = choose_pool(header, config.full_pool_ids)
        if pool is None:
            return envelope_error(
                "ResourcePoolFull",
                f"resource pools {header} are all over their utilisation limit; add `default` to the "
                "list to fall back to the shared pool",
                "RESOURCE_POOL_FULL",
            )
        now = self.clock.monotonic()
        duration = self.task_duration(workflow_id)
        acquired, begin, end = self._schedule(now, duration)
        task = Task(
            task_id=uuid.uuid4().hex,
            workflow_id=workflow_id,
            seq=len(self._acquired) - 1,
            created=now,
            created_wall=self.clock.time(),
            duration=duration,
            acquired=acquired,
            begin=begin,
            end=end,
            eta_factor=self._eta_factor(),
            inputs=inputs,
            return_temp_files=bool(body.get("return_temp_files")),
            failing=workflow_id in config.failing_workflow_ids,
            images_only=workflow_id in config.images_only_workflow_ids,
            alias_id=body.get("alias_id"),
            version_id=body.get("version_id"),
            resource_config_id=header,
            pool=pool,
        )
        self.tasks[task.task_id] = task
        self.predictions += 1
        estimate = round(duration * task.eta_factor, 3)
        return envelope({"taskId": task.task_id, "status": "waiting", "estimatedDurationInSeconds": estimate})

    def _task_or_error(self, body: dict) -> Task | dict:
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            return invalid_parameter("taskId is required")
        task = self.tasks.get(task_id)
        if task is None:
            return envelope_error("TaskNotFound", f"task {task_id} not found", "TASK_NOT_FOUND")
        return task

    def progress(self, body: dict, headers: Mapping[str, str]) -> dict:
        task = self._task_or_error(body)
        if isinstance(task, dict):
            return task
        now = self.clock.monotonic()
        status = task.status(now)
        fraction = task.fraction(now)
        data: dict[str, Any] = {
            "taskId": task.task_id,
            "status": status,
            "progress": round(min(fraction, 0.999), 3) if status == "running" else fraction,
            "etaRelative": round(max(0.0, task.end - now) * task.eta_factor, 3),
        }
        if status == "waiting":
            ahead = self.queue_ahead(task, now)
            data["lastQueueRemaining"] = ahead
            data["message"] = f"queued, {ahead} ahead" if ahead else "queued"
        elif status == "running":
            state = node_state(fraction)
            data["state"] = state
            data["message"] = f"executing {state['node']} (step {state['step']}/{state['steps']})"
        else:
            data["message"] = "finished" if status == "succeeded" else "execution failed"
        return envelope(data)

    def result(self, body: dict, headers: Mapping[str, str]) -> dict:
        task = self._task_or_error(body)
        if isinstance(task, dict):
            return task
        status = task.status(self.clock.monotonic())
        if status in ("waiting", "running"):
            return envelope_error(
                "TaskNotFinished",
                f"task {task.task_id} is not finished yet (status {status})",
                "TASK_NOT_FINISHED",
                data={"taskId": task.task_id, "status": status},
            )
        if status == "failed":
            return envelope_error(
                "TaskFailed",
                "Node #7 (KSampler) failed: emulated workflow execution failure",
                "WORKFLOW_EXECUTION_FAILED",
                data={"taskId": task.task_id, "status": "failed"},
            )
        urls = {name: self.output_url(task.task_id, name) for name in task.output_names()}
        result: dict[str, Any] = {}
        if not task.images_only:
            result = {"images": {"url": urls["output"]}}
            result.update({name: {"url": urls[name]} for name in TEMP_FILE_NAMES if name in urls})
        begin_ms = task.wall_ms(task.begin)
        duration_ms = round((task.end - task.begin) * 1000)
        return envelope(
            {
                "taskId": task.task_id,
                "status": "succeeded",
                "result": result,
                "images": [urls[name] for name in (DEFAULT_IMAGE_NAMES if task.images_only else ("output",))],
                "taskDuration": duration_ms,
                "taskBeginTime": begin_ms,
                "taskEndTime": begin_ms + duration_ms,
                "info": {
                    "workflowId": task.workflow_id,
                    "durationSeconds": f"{task.duration:g}",
                    "resourceConfigId": task.pool,
                },
            }
        )
