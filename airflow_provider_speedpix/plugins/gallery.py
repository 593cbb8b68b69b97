"""The SpeedPix gallery: a DAG run's (or task instance's) generated images in the Airflow UI.

An Airflow 3 plugin (``airflow.plugins`` entry point) with two parts:

* a FastAPI app the api-server mounts at ``/speedpix`` (``fastapi_apps``):
  ``/speedpix/gallery/dags/{dag_id}/runs/{run_id}`` (optionally ``?task_id=..&map_index=..``) renders the
  page; ``.../thumb/{task_id}/{map_index}/{n}`` serves a small PNG preview of the task's n-th saved file
  and ``.../file/{task_id}/{map_index}/{n}`` the file itself;
* ``external_views`` that add a "SpeedPix images" tab to every DAG run and task instance page (Airflow
  fills ``{DAG_ID}``, ``{RUN_ID}``, ``{TASK_ID}`` and ``{MAP_INDEX}`` and shows the page in an iframe).

Access follows Airflow's own auth: every route depends on the api-server's
``requires_access_dag("GET", DagAccessEntity.XCOM)`` for the DAG in the path (the same check that guards
the XCom API the data comes from), with the user from Airflow's JWT (cookie or bearer token). A user who
cannot read the DAG's XComs gets 403 and sees no image; a browser without a session is sent to the login
page. Files are addressed by their position in what the task saved, never by path.

Thumbnails are made on the server without Pillow (not a dependency of Airflow): PNGs are decoded,
box-downscaled to at most 240 px and re-encoded by the provider's pure-Python codec, cached in memory and
sent with ``Cache-Control: private``. Other image types are sent as they are when small (at most 1 MiB),
else the page shows a "no preview" tile. The page uses no JavaScript (Airflow's plugin iframe is
sandboxed without scripts).
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
import mimetypes
import os
import urllib.parse
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow_provider_speedpix import _png
from airflow_provider_speedpix.plugins import gallery_data as data

log = logging.getLogger(__name__)

URL_PREFIX = "/speedpix"
THUMB_SIDE = 240
#: non-PNG files up to this size are sent as their own preview
MAX_PASSTHROUGH_PREVIEW = 1024 * 1024
CACHE_CONTROL = "private, max-age=3600"


@functools.lru_cache(maxsize=512)
def _thumbnail(location: str, stamp: str) -> tuple[bytes, str]:
    """``(bytes, media type)`` of the preview of ``location`` (``stamp`` changes when the file does)."""
    raw = data.read_limited(location)
    if raw.startswith(_png.PNG_SIGNATURE):
        try:
            return _png.thumbnail(raw, THUMB_SIDE), "image/png"
        except _png.PNGError as err:
            log.info("Gallery: no PNG preview of %s: %s", location, err)
    if len(raw) <= MAX_PASSTHROUGH_PREVIEW:
        return raw, mimetypes.guess_type(location)[0] or "application/octet-stream"
    return _no_preview(), "image/svg+xml"


def _no_preview() -> bytes:
    return (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="240" height="160" viewBox="0 0 240 160">'
        b'<rect width="240" height="160" fill="#eef0f3"/><text x="120" y="85" font-family="sans-serif" '
        b'font-size="14" text-anchor="middle" fill="#6b7280">no preview</text></svg>'
    )


def _stamp(location: str) -> str:
    """What identifies a version of the file: size and mtime for local files, the URI otherwise."""
    if "://" not in location or location.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(location).path) if "://" in location else location
        try:
            st = os.stat(path)
            return f"{st.st_size}-{st.st_mtime_ns}"
        except OSError:
            return "missing"
    return "object"


def create_app() -> FastAPI:
    app = FastAPI(
        title="SpeedPix gallery",
        description="The images a DAG run's SpeedPix tasks saved (airflow-provider-speedpix).",
    )
    can_read = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.XCOM))]

    @app.exception_handler(HTTPException)
    async def to_login(request: Request, exc: HTTPException) -> Response:
        """A browser without a session goes to Airflow's login page and comes back; APIs get JSON."""
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), 307)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def task_files(session: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[str]:
        entries = data.collect(
            session, dag_id, run_id, task_id=task_id, map_index=map_index, error_lookup=None
        )
        if not entries:
            raise HTTPException(404, "No SpeedPix task instance with saved files here")
        return entries[0].files

    def pick(files: list[str], n: int) -> str:
        if not 0 <= n < len(files):
            raise HTTPException(404, "No such file")
        return files[n]

    @app.get("/gallery/dags/{dag_id}/runs/{run_id}", dependencies=can_read, response_class=HTMLResponse)
    def gallery(
        dag_id: str,
        run_id: str,
        session: SessionDep,
        task_id: str | None = None,
        map_index: Annotated[int | None, "map index; -1 for an unmapped task"] = None,
    ) -> HTMLResponse:
        if map_index is not None and map_index < -1:
            map_index = None  # Airflow fills {MAP_INDEX} with -1 for unmapped tasks; anything lower: all
        entries = data.collect(session, dag_id, run_id, task_id=task_id, map_index=map_index)
        page = render(dag_id, run_id, entries, task_id=task_id)
        return HTMLResponse(page, headers={"Cache-Control": "private, no-cache"})

    @app.get("/gallery/dags/{dag_id}/runs/{run_id}/thumb/{task_id}/{map_index}/{n}", dependencies=can_read)
    def thumb(
        dag_id: str, run_id: str, task_id: str, map_index: int, n: int, session: SessionDep
    ) -> Response:
        location = pick(task_files(session, dag_id, run_id, task_id, map_index), n)
        stamp = _stamp(location)
        try:
            body, media_type = _thumbnail(location, stamp)
        except (OSError, ValueError) as err:
            log.info("Gallery: cannot read %s: %s", location, err)
            body, media_type = _no_preview(), "image/svg+xml"
        etag = '"' + hashlib.sha256(f"{location}|{stamp}".encode()).hexdigest()[:32] + '"'
        return Response(body, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL, "ETag": etag})

    @app.get("/gallery/dags/{dag_id}/runs/{run_id}/file/{task_id}/{map_index}/{n}", dependencies=can_read)
    def file(dag_id: str, run_id: str, task_id: str, map_index: int, n: int, session: SessionDep) -> Response:
        location = pick(task_files(session, dag_id, run_id, task_id, map_index), n)
        try:
            body = data.read_limited(location)
        except (OSError, ValueError) as err:
            raise HTTPException(404, f"Cannot read the file: {err}") from None
        name = os.path.basename(urllib.parse.urlsplit(location).path) or "file"
        return Response(
            body,
            media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
            headers={
                "Cache-Control": CACHE_CONTROL,
                "Content-Disposition": f"inline; filename*=UTF-8''{urllib.parse.quote(name)}",
            },
        )

    return app


# ---------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#1f2937;background:#fff}
h1{font-size:18px;margin:0 0 4px}.sub{color:#6b7280;font-size:13px;margin-bottom:16px}
h2{font-size:15px;margin:20px 0 8px}.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #e5e7eb;border-radius:8px;width:392px;padding:10px;box-sizing:border-box}
.card.failed{border-color:#fca5a5;background:#fef2f2}
.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:6px}.thumbs:empty{display:none}
.thumbs img{max-width:118px;max-height:118px;border:1px solid #e5e7eb;background:#fafafa}
dl{display:grid;grid-template-columns:auto 1fr;gap:2px 8px;font-size:12px;margin:8px 0 0}
dt{color:#6b7280}dd{margin:0;word-break:break-all;font-family:ui-monospace,monospace}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}.other{background:#e0e7ff;color:#3730a3}
.err{font-size:12px;color:#991b1b;margin-top:6px;word-break:break-word}.empty{color:#6b7280}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _badge(status: str) -> str:
    kind = "ok" if status in ("succeeded", "success") else ("bad" if status == "failed" else "other")
    return f'<span class="badge {kind}">{_e(status)}</span>'


def render(dag_id: str, run_id: str, entries: list[data.TaskEntry], *, task_id: str | None = None) -> str:
    """The gallery page: one card per prediction, thumbnails linking to the full file.

    Links are relative to the page (``.../runs/<run_id>``), so they work behind any proxy or base URL.
    """
    run_path = "./" + urllib.parse.quote(run_id, safe="")
    predictions = [p for entry in entries for p in entry.predictions]
    failed = sum(p.failed for p in predictions)
    images = sum(len(p.files) for p in predictions)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>SpeedPix images: {_e(dag_id)} / {_e(run_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>SpeedPix images of {_e(dag_id)}</h1>",
        f"<div class='sub'>Run <b>{_e(run_id)}</b>{' · task ' + _e(task_id) if task_id else ''} · "
        f"<span id='counts'>{len(predictions)} predictions, {images} files, {failed} failed</span></div>",
    ]
    if not predictions and not any(e.manifest_error for e in entries):
        parts.append("<p class='empty'>No SpeedPix task of this run has saved anything yet.</p>")
    for entry in entries:
        label = entry.task_id + (f" [{entry.map_index}]" if entry.map_index >= 0 else "")
        parts.append(f"<h2>{_e(label)} <small>{_badge(entry.state or 'no state')}</small></h2>")
        if entry.manifest_error:
            parts.append(f"<p class='err'>{_e(entry.manifest_error)}</p>")
        parts.append("<div class='grid'>")
        for p in entry.predictions:
            thumbs = []
            for location, n in zip(p.files, p.file_indexes, strict=True):
                where = f"{urllib.parse.quote(entry.task_id, safe='')}/{entry.map_index}/{n}"
                name = os.path.basename(urllib.parse.urlsplit(location).path) or location
                if data.is_image(location):
                    thumbs.append(
                        f"<a href='{run_path}/file/{where}' target='_blank' rel='noopener' title='{_e(location)}'>"
                        f"<img class='thumb' src='{run_path}/thumb/{where}' alt='{_e(name)}' decoding='async'></a>"
                    )
                else:
                    thumbs.append(f"<a href='{run_path}/file/{where}' target='_blank'>{_e(name)}</a>")
            rows = [
                ("item", p.item_id) if p.item_id is not None else None,
                ("prediction", p.prediction_id),
                ("workflow", p.workflow_id or "-"),
                ("duration", _duration(p.run_seconds)),
                ("files", len(p.files)),
            ]
            dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in filter(None, rows))
            error = ""
            if p.failed and (p.error_code or p.error_message):
                code = f"<b>{_e(p.error_code)}</b>: " if p.error_code else ""
                error = f"<div class='err'>{code}{_e(p.error_message or '')}</div>"
            parts.append(
                f"<div class='card{' failed' if p.failed else ''}' data-status='{_e(p.status)}'>"
                f"<div class='thumbs'>{''.join(thumbs)}</div>{_badge(p.status)}<dl>{dl}</dl>{error}</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


class SpeedPixGalleryPlugin(AirflowPlugin):
    """Registers the gallery app and its tabs on DAG run and task instance pages."""

    name = "speedpix_gallery"
    fastapi_apps = [  # noqa: RUF012 - AirflowPlugin declares these as plain class attributes
        {"app": create_app(), "url_prefix": URL_PREFIX, "name": "SpeedPix gallery"}
    ]
    external_views = [  # noqa: RUF012
        {
            "name": "SpeedPix images",
            "href": URL_PREFIX + "/gallery/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "speedpix_images_run",
            "category": "SpeedPix",
        },
        {
            "name": "SpeedPix images",
            "href": URL_PREFIX
            + "/gallery/dags/{DAG_ID}/runs/{RUN_ID}?task_id={TASK_ID}&map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": "speedpix_images_task",
            "category": "SpeedPix",
        },
    ]
