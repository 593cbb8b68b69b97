"""Operator extra links: "SpeedPix outputs" (where the task saves its files) and "SpeedPix console".

Each link's URL is computed on the worker in ``execute()`` and pushed to XCom under the link's
``xcom_key`` before the task submits or defers (:func:`persist_links`), so the buttons are there while the
task waits on the triggerer and stay after it (a deferral does not clear XCom). ``get_link`` reads the
stored URL back; Airflow's api-server reads the same XCom key. What is stored is a plain location: an
``output_dir`` (a connection id in it dropped), the endpoint's origin; never a signed URL or a secret.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import PurePath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom, conf

from airflow_provider_speedpix._inputs import is_object_storage_path

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import BaseOperator, Context, TaskInstanceKey

log = logging.getLogger(__name__)

#: The gallery plugin's task-instance page (``plugins/gallery.py``: ``URL_PREFIX`` + its page route).
GALLERY_PATH = "/speedpix/gallery/dags/{dag_id}/runs/{run_id}"
#: SpeedPix documents no console address or deep link to a task or workflow: the console link opens the
#: connection's endpoint origin (``https://openai.edu-aliyun.com`` by default), the console's root.
DEFAULT_CONSOLE = "https://openai.edu-aliyun.com"
S3_CONSOLE = "https://s3.console.aws.amazon.com/s3/buckets/{bucket}?{query}"
GCS_CONSOLE = "https://console.cloud.google.com/storage/browser/{bucket}/{prefix}"


class _StoredLink(BaseOperatorLink):
    """A link whose URL the operator stored in XCom under ``xcom_key`` (empty: no button)."""

    xcom_key: str

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        value = XCom.get_value(ti_key=ti_key, key=self.xcom_key)
        return value if isinstance(value, str) else ""


class SpeedPixOutputsLink(_StoredLink):
    """Where the task's files are: the S3 or GCS console for object storage, else the gallery page."""

    name = "SpeedPix outputs"
    xcom_key = "speedpix_outputs_link"


class SpeedPixConsoleLink(_StoredLink):
    """The SpeedPix console (its root: no deep link to a task or workflow is documented)."""

    name = "SpeedPix console"
    xcom_key = "speedpix_console_link"


def outputs_url(location: Any, *, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """A browser URL for the outputs at ``location``: the AWS S3 / Google Cloud Storage console at the
    prefix for ``s3://`` / ``gs://``, else the provider's gallery page of this task instance (under
    ``[api] base_url`` when set)."""
    text = os.fspath(location) if isinstance(location, str | PurePath) else str(location)
    if "://" in text or is_object_storage_path(location):
        parts = urlsplit(text)
        bucket = parts.netloc.rpartition("@")[2]  # s3://conn_id@bucket: the connection id is no place
        prefix = parts.path.strip("/")
        prefix = prefix + "/" if prefix else ""
        if parts.scheme in ("s3", "s3a") and bucket:
            query = urlencode({"prefix": prefix}, safe="/", quote_via=quote)
            return S3_CONSOLE.format(bucket=quote(bucket), query=query)
        if parts.scheme in ("gs", "gcs") and bucket:
            return GCS_CONSOLE.format(bucket=quote(bucket), prefix=quote(prefix))
    path = GALLERY_PATH.format(dag_id=quote(dag_id, safe=""), run_id=quote(run_id, safe=""))
    query = urlencode({"task_id": task_id, "map_index": map_index})
    base = (conf.get("api", "base_url", fallback=None) or "").rstrip("/")
    return f"{base}{path}?{query}"


def console_url(endpoint: str | None) -> str:
    """The endpoint's origin (scheme and host; no credentials, path or query)."""
    parts = urlsplit(endpoint or DEFAULT_CONSOLE)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}/" if parts.scheme and host else DEFAULT_CONSOLE + "/"


def persist_links(context: Context, *, output_location: Any, endpoint: Callable[[], str]) -> None:
    """Push both links' URLs to XCom now, before the task submits or defers. ``output_location``: where
    this task instance saves files (``None``: nothing is saved); ``endpoint`` returns the connection's
    endpoint. A link that cannot be made is stored empty (no button; ``get_link`` still finds its key):
    a link never fails a task."""
    ti = context.get("ti")
    if ti is None:  # execute() called outside a task run (a unit test): nowhere to store them
        return
    console = _made(SpeedPixConsoleLink, lambda: console_url(endpoint()))
    outputs = _made(
        SpeedPixOutputsLink,
        lambda: (
            outputs_url(
                output_location,
                dag_id=ti.dag_id,
                run_id=ti.run_id,
                task_id=ti.task_id,
                map_index=getattr(ti, "map_index", -1),
            )
            if output_location is not None
            else ""
        ),
    )
    ti.xcom_push(key=SpeedPixConsoleLink.xcom_key, value=console)
    ti.xcom_push(key=SpeedPixOutputsLink.xcom_key, value=outputs)


def _made(link: type[_StoredLink], make: Callable[[], str]) -> str:
    try:
        return make()
    except Exception as err:
        log.warning("No %r link: %s", link.name, err)
        return ""


#: What both operators declare as ``operator_extra_links``.
OPERATOR_LINKS = (SpeedPixOutputsLink(), SpeedPixConsoleLink())
