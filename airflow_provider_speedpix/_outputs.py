"""Where a task's output files go: one naming rule for every output URL, and a folder of its own for a
task instance whose ``output_dir`` other instances share (README, "Where files are saved")."""

from __future__ import annotations

from pathlib import Path, PurePath, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_speedpix._protocol import iter_prediction_urls
from airflow_provider_speedpix._storage import safe_filename


def output_files_plan(output: Any, output_dir: Any, images: Any = ()) -> list[tuple[str, str, Any]]:
    """``(place, url, destination)`` for every output URL of a prediction, the one file-naming rule.

    Custom result fields are named after their field: ``images.png``, ``subject_image.png``; list items
    get an index (``gallery_0.jpg``). Default images (``images``, the output of a workflow without custom
    output fields) are ``image_0.png``, ``image_1.png``... (the URL's suffix, else ``.png``); one whose URL
    the result already holds is saved once, under the result's name. No two files get the same name: a
    later clash (with a custom field, case-insensitively) gets ``-2``, ``-3``... before its suffix.
    """
    plan = []
    taken: set[str] = set()
    for place in iter_prediction_urls(output, images):
        suffix = PurePosixPath(urlsplit(place.url).path).suffix[:10]
        if place.root == "images" and len(suffix) < 2:
            suffix = ".png"
        name = _unique(safe_filename(place.stem + suffix), taken)
        plan.append((place.where, place.url, _join(output_dir, name)))
    return plan


def _unique(name: str, taken: set[str]) -> str:
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        stem, suffix = name, ""
    candidate, number = name, 1
    while candidate.lower() in taken:
        number += 1
        candidate = f"{stem}-{number}" + (f".{suffix}" if suffix else "")
    taken.add(candidate.lower())
    return candidate


def _dir_key(value: Any) -> str | None:
    """How an ``output_dir`` was written, to tell whether two tasks were given the same one (templates as
    written: the same template renders the same in one run); ``None``: not comparable (an XComArg...)."""
    if isinstance(value, (str, PurePath)) or type(value).__name__ == "ObjectStoragePath":
        return str(value).rstrip("/") or "/"
    return None


def _raw_output_dir(task: Any) -> Any:
    """The ``output_dir`` a task of the DAG was given, unrendered (a mapped task's from ``.partial``)."""
    if hasattr(task, "_output_dir_as_written"):  # a SpeedPix operator
        return task._output_dir_as_written
    operator_class = getattr(task, "operator_class", None)
    partial = getattr(task, "partial_kwargs", None)
    if partial and hasattr(operator_class, "_output_dir_as_written"):
        return partial.get("output_dir")
    return None


def _join(directory: Any, name: str) -> Any:
    if isinstance(directory, str):
        if "://" in directory:
            from airflow.sdk import ObjectStoragePath

            return ObjectStoragePath(directory) / name
        return Path(directory).expanduser() / name
    return directory / name


def instance_output_base(task: Any, context: Any) -> Any:
    """Where this task instance saves its files: ``output_dir``, in a folder of its own when other task
    instances are given the same one (README, "Where files are saved"): ``<task_id>/`` when another task
    of the DAG has the same ``output_dir``, then ``<map_index>/`` for an instance of a mapped task whose
    ``output_dir`` all its instances share (given in ``.partial``). Stable across retries."""
    base = task.output_dir
    dag = task.dag if task.has_dag() else None
    tasks = dict(getattr(dag, "task_dict", None) or {})
    mine = _dir_key(task._output_dir_as_written)
    if mine is not None and any(
        _dir_key(_raw_output_dir(other)) == mine
        for task_id, other in tasks.items()
        if task_id != task.task_id
    ):
        base = _join(base, safe_filename(task.task_id))
    map_index = getattr(context.get("ti"), "map_index", -1)
    if isinstance(map_index, int) and map_index >= 0:
        node = tasks.get(task.task_id)
        partial = getattr(node, "partial_kwargs", None)
        # given per instance (in .expand / .expand_kwargs): each instance already has its own place
        per_instance = isinstance(partial, dict) and "output_dir" not in partial
        if not per_instance:
            base = _join(base, str(map_index))
    return base
