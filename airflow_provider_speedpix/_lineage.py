"""OpenLineage for the SpeedPix operators: the files read, the files written, and a run facet.

Called only by the operators' ``get_openlineage_facets_on_complete`` / ``_on_failure``, which the
OpenLineage provider's listener calls. The module imports without OpenLineage (its naming rules are plain
Python); building the lineage needs ``apache-airflow-providers-openlineage`` (docs/operators.md,
"OpenLineage").

Datasets follow OpenLineage's naming: a local file is namespace ``file``, name its absolute path; an
object-storage location ``s3://bucket/key`` is namespace ``s3://bucket``, name ``key`` (the same for
``gs``, ``abfs``...). A connection id (``s3://conn_id@bucket/...``) and any query string are dropped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_speedpix._batch_manifest import MANIFEST_NAME, output_path
from airflow_provider_speedpix._inputs import (
    expand_user,
    file_named_by,
    is_file_object,
    is_object_storage_path,
)

#: Past this many files a dataset list names their folders instead (a batch of thousands of items).
MAX_DATASETS = 20
#: Where the facets' fields are described (no JSON schema of them is published).
FACETS_DOC = "https://pypi.org/project/airflow-provider-speedpix/"
LOCAL_SCHEMES = ("file", "local")
PREDICTION_FACET = "speedpixPrediction"
BATCH_FACET = "speedpixBatch"


@functools.cache
def facet_classes() -> tuple[Any, Any]:
    """``(SpeedPixPredictionRunFacet, SpeedPixBatchRunFacet)``, defined on first use: they extend
    OpenLineage's ``RunFacet``, which exists only where OpenLineage is installed. Fields are camelCase,
    as OpenLineage's own facets; ``None`` fields are left out of the event."""
    import attrs
    from airflow.providers.common.compat.openlineage.facet import RunFacet

    if not isinstance(RunFacet, type):  # common-compat's stand-in where the OpenLineage client is missing
        raise ImportError(
            "SpeedPix lineage needs the OpenLineage client (apache-airflow-providers-openlineage)"
        )

    @attrs.define
    class SpeedPixPredictionRunFacet(RunFacet):
        """One prediction of ``SpeedPixRunOperator`` (run facet ``speedpixPrediction``)."""

        predictionId: str | None = None
        workflowId: str | None = None
        aliasId: str | None = None
        versionId: str | None = None
        invokeId: str | None = None
        status: str | None = None
        errorCode: str | None = None
        runSeconds: float | None = None

        @staticmethod
        def _get_schema() -> str:
            return f"{FACETS_DOC}#/$defs/SpeedPixPredictionRunFacet"

    @attrs.define
    class SpeedPixBatchRunFacet(RunFacet):
        """One ``SpeedPixBatchRunOperator`` task instance (run facet ``speedpixBatch``)."""

        workflowId: str | None = None
        aliasId: str | None = None
        versionId: str | None = None
        total: int = 0
        succeeded: int = 0
        failed: int = 0
        predictionsCreated: int = 0
        runSeconds: float = 0.0
        manifest: str | None = None

        @staticmethod
        def _get_schema() -> str:
            return f"{FACETS_DOC}#/$defs/SpeedPixBatchRunFacet"

    return SpeedPixPredictionRunFacet, SpeedPixBatchRunFacet


def operator_lineage(
    inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], facets: dict[str, Any]
) -> Any:
    """The ``OperatorLineage`` the listener expects, from ``(namespace, name)`` pairs."""
    from airflow.providers.common.compat.openlineage.facet import Dataset
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(
        inputs=[Dataset(namespace=namespace, name=name) for namespace, name in inputs],
        outputs=[Dataset(namespace=namespace, name=name) for namespace, name in outputs],
        run_facets=facets,
    )


# ---------------------------------------------------------------------- naming
def dataset_name(location: Any) -> tuple[str, str] | None:
    """``(namespace, name)`` of a local path or an object-storage URI / ``ObjectStoragePath``."""
    text = os.fspath(location) if isinstance(location, str | PurePath) else str(location)
    if not text:
        return None
    if "://" not in text:
        return "file", os.path.abspath(expand_user(Path(text)))
    parts = urlsplit(text)
    scheme, host = parts.scheme.lower(), parts.netloc.rpartition("@")[2]
    if scheme in LOCAL_SCHEMES:
        return "file", str(PurePosixPath("/" + parts.path.lstrip("/")))
    key = parts.path.lstrip("/").rstrip("/")
    return (f"{scheme}://{host}" if host else scheme), key or "/"


def datasets(locations: Iterable[Any]) -> list[tuple[str, str]]:
    """Distinct ``(namespace, name)`` in first-seen order; past :data:`MAX_DATASETS`, their folders (at
    most that many)."""
    names = list(dict.fromkeys(n for n in map(dataset_name, locations) if n is not None))
    if len(names) > MAX_DATASETS:
        folders = (_parent(namespace, name) for namespace, name in names)
        names = list(dict.fromkeys(folders))[:MAX_DATASETS]
    return names


def _parent(namespace: str, name: str) -> tuple[str, str]:
    parent = str(PurePosixPath(name).parent)
    return namespace, "/" if parent in (".", "") else parent


# ---------------------------------------------------------------------- inputs
def input_files(value: Any) -> list[Any]:
    """The files in ``inputs`` that the operator sends, by the rule ``_inputs.InputPreparer`` applies: a
    string that looks like a local path and exists (or names a media file), ``Path``,
    ``ObjectStoragePath``, a file object opened from a path. Text (an ``s3://`` string included) is sent
    as text, so it is no input dataset."""
    found: list[Any] = []
    if isinstance(value, str):
        path = file_named_by(value)
        if path is not None:
            found.append(path)
    elif isinstance(value, Mapping):
        for item in value.values():
            found += input_files(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            found += input_files(item)
    elif is_object_storage_path(value) or isinstance(value, PurePath):
        found.append(value)
    elif is_file_object(value):
        name = getattr(value, "name", None)
        if isinstance(name, str) and os.path.isabs(name):
            found.append(name)
    return found


def _catalog_file(items: Any) -> list[Any]:
    """A batch's ``items`` when it is a file (CSV / JSON lines) rather than a list."""
    if isinstance(items, str | PurePath) or is_object_storage_path(items):
        return [items]
    return []


# ---------------------------------------------------------------------- operators
def _alias(alias_id: str | None, version_id: str | None) -> str | None:
    """The alias the API runs: ``main`` when neither an alias nor a version is given."""
    return alias_id or (None if version_id else "main")


def run_lineage(operator: Any) -> Any:
    """``SpeedPixRunOperator``: input files, saved files, the prediction's facet."""
    prediction = getattr(operator, "_last_prediction", None)
    state = getattr(operator, "_state", None) or {}
    prediction_id = getattr(prediction, "id", None) or state.get("prediction_id")
    facet = facet_classes()[0](
        predictionId=prediction_id if isinstance(prediction_id, str) else None,
        workflowId=_text(operator.workflow_id),
        aliasId=_alias(_text(operator.alias_id), _text(operator.version_id)),
        versionId=_text(operator.version_id),
        invokeId=getattr(prediction, "invoke_id", None),
        status=getattr(prediction, "status", None),
        errorCode=getattr(prediction, "error_code", None),
        runSeconds=getattr(prediction, "run_seconds", None),
    )
    outputs = datasets(getattr(operator, "_saved_files", None) or [])
    return operator_lineage(datasets(input_files(operator.inputs)), outputs, {PREDICTION_FACET: facet})


def batch_lineage(operator: Any, *, finished: bool) -> Any:
    """``SpeedPixBatchRunOperator``: the catalog file and the items' input files (their folders past
    :data:`MAX_DATASETS`), ``output_dir`` (not each file), the counts' facet. ``finished``: the manifest
    was written (on a failure it is named only when it exists)."""
    state = getattr(operator, "_state", None)
    items = state.items if state is not None else []
    files = [file for item in items for file in input_files(item.inputs)]
    meta = getattr(operator, "_meta", None) or {}
    counts = state.counts() if state is not None else None
    manifest = _manifest(operator.output_dir, finished=finished)
    facet = facet_classes()[1](
        workflowId=_text(operator.workflow_id),
        aliasId=_alias(_text(operator.alias_id), _text(operator.version_id)),
        versionId=_text(operator.version_id),
        total=counts.total if counts else 0,
        succeeded=counts.succeeded if counts else 0,
        failed=counts.failed if counts else 0,
        predictionsCreated=int(meta.get("created") or 0),
        runSeconds=state.total_run_seconds() if state is not None else 0.0,
        manifest=manifest,
    )
    inputs = list(dict.fromkeys(datasets(_catalog_file(operator.items)) + datasets(files)))
    outputs = datasets([operator.output_dir]) if operator.output_dir else []
    return operator_lineage(inputs, outputs, {BATCH_FACET: facet})


def _manifest(output_dir: Any, *, finished: bool) -> str | None:
    if not output_dir:
        return None
    location = output_path(output_dir, MANIFEST_NAME)
    if not finished:
        try:
            if not location.exists():
                return None
        except Exception:  # lineage never fails a task; an unreadable store names no manifest
            return None
    return str(location)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
