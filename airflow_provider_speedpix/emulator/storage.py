"""Object storage: the upload-sign call, pre-signed ``PUT /_emulator/upload/<key>`` and file serving.

``sp_create_temp_file_upload_sign`` hands out ``/_emulator/upload/<key>?Expires=..&Signature=..`` (the
token is a credential for its lifetime); the PUT checks token, expiry and content type and streams the
body to disk. ``GET /_emulator/files/<key>`` serves uploads and the generated outputs (real PNGs derived
from the task's input image, only once their task succeeded). Output URLs are pre-signed too, like a
private OSS bucket's: ``outputs/<task>/<name>.png?Expires=<epoch s>&Signature=<HMAC>``; a missing, wrong
or expired signature is refused with 403. Errors look like OSS's XML errors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, Response

from .clock import Clock
from .config import EmulatorConfig
from .png import PNG_SIGNATURE, output_png
from .wire import envelope, envelope_error

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: how long a pre-signed output URL stays valid (the API reference: output URLs are temporary)
OUTPUT_URL_TTL_S = 3600.0
#: input images larger than this are not decoded: the output falls back to the generated image
MAX_SOURCE_BYTES = 8 * 1024 * 1024


def sign_output(config: EmulatorConfig, key: str, expires: int) -> str:
    """The ``Signature`` of an output URL: HMAC-SHA256 of key and expiry under a key derived from the
    emulator's app secret (so it survives a restart, and is not the secret itself)."""
    url_key = hmac.new(config.app_secret.encode(), b"speedpix-emulator output URLs", hashlib.sha256).digest()
    digest = hmac.new(url_key, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a prediction's inputs, ``image`` first (the sample workflow's input)."""
    if isinstance(value, dict):
        ordered = sorted(value.items(), key=lambda item: item[0] != "image")
        for _, item in ordered:
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


@dataclass
class Upload:
    token: str
    expires: int
    content_type: str
    original_filename: str
    path: str | None = None
    stored_type: str | None = None
    size: int = 0


def oss_error(status: int, code: str, message: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{uuid.uuid4().hex.upper()[:24]}</RequestId><HostId>emulator</HostId></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml", headers={"x-oss-request-id": ""})


def _no_such_key() -> Response:
    return oss_error(404, "NoSuchKey", "The specified key does not exist.")


def _signature_mismatch(message: str) -> Response:
    return oss_error(403, "SignatureDoesNotMatch", message)


def safe_object_name(filename: str) -> str:
    """An ASCII object name that keeps the extension: ``产品 照片.png`` -> ``file.png``."""
    base = os.path.basename(filename.replace("\\", "/"))
    stem, dot, ext = base.rpartition(".") if "." in base else (base, "", "")
    stem = _UNSAFE_NAME.sub("_", stem).strip("_.") or "file"
    ext = _UNSAFE_NAME.sub("", ext)
    return f"{stem}.{ext}" if dot and ext else stem


class Storage:
    """Uploads on disk under ``storage_dir`` (a temporary directory unless configured)."""

    def __init__(
        self, config: EmulatorConfig, clock: Clock, output_available: Callable[[str, str], Any]
    ) -> None:
        self.config = config
        self.clock = clock
        self._output_available = output_available  # (task_id, variant) -> the task if servable now
        self._own_dir = config.storage_dir is None
        self.storage_dir = config.storage_dir or tempfile.mkdtemp(prefix="speedpix-emulator-")
        self.objects = os.path.join(self.storage_dir, "objects")
        os.makedirs(self.objects, exist_ok=True)
        self.uploads: dict[str, Upload] = {}

    def reset(self) -> None:
        """Forget uploads and delete their files."""
        self.uploads = {}
        shutil.rmtree(self.objects, ignore_errors=True)
        os.makedirs(self.objects, exist_ok=True)

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def stored(self) -> int:
        return sum(1 for upload in self.uploads.values() if upload.path)

    # -- sp_create_temp_file_upload_sign ---------------------------------------------------------------

    def sign_upload(self, body: dict, headers: Mapping[str, str]) -> dict:
        content_type = body.get("contentType") or "application/octet-stream"
        filename = body.get("originalFilename") or "file"
        if not isinstance(content_type, str) or not isinstance(filename, str):
            return envelope_error("InvalidParameter", "contentType and originalFilename must be strings")
        now = self.clock.time()
        day = time.strftime("%Y%m%d", time.gmtime(now))
        object_key = f"uploads/{day}/{uuid.uuid4().hex}/{safe_object_name(filename)}"
        expires = int(now + self.config.upload_url_ttl_s)
        token = secrets.token_urlsafe(24)
        self.uploads[object_key] = Upload(
            token=token, expires=expires, content_type=content_type, original_filename=filename
        )
        base_url = self.config.public_url
        return envelope(
            {
                "uploadUrl": f"{base_url}/_emulator/upload/{object_key}?Expires={expires}&Signature={token}",
                "objectKey": object_key,
                "path": object_key,
                "expireTime": expires,
                "accessUrl": f"{base_url}/_emulator/files/{object_key}",
            }
        )

    # -- PUT /_emulator/upload/<key> -------------------------------------------------------------------

    def refuse_put(self, request: Request) -> Response | None:
        """OSS's answer when the pre-signed URL is not valid for this PUT; None when it is."""
        upload = self.uploads.get(request.path_params["key"])
        token = request.query_params.get("Signature", "")
        expires = request.query_params.get("Expires", "")
        if upload is None or not secrets.compare_digest(token.encode(), upload.token.encode()):
            return _signature_mismatch(
                "The request signature we calculated does not match the signature you provided."
            )
        if expires != str(upload.expires):
            return _signature_mismatch("Expires does not match the signed value.")
        if self.clock.time() >= upload.expires:
            return oss_error(403, "AccessDenied", "Request has expired.")
        content_type = request.headers.get("content-type", "")
        if upload.content_type and content_type.split(";")[0].strip() != upload.content_type.split(";")[0]:
            return _signature_mismatch("Content-Type does not match the one the upload URL was signed for.")
        return None

    async def put(self, request: Request) -> Response:
        """Stream the body to disk (after :meth:`refuse_put` let it through)."""
        key = request.path_params["key"]
        upload = self.uploads[key]
        content_type = request.headers.get("content-type", "")
        final = os.path.join(self.objects, uuid.uuid5(uuid.NAMESPACE_URL, key).hex)
        partial = f"{final}.{uuid.uuid4().hex}.part"
        size = 0
        try:
            with open(partial, "wb") as fh:
                async for chunk in request.stream():
                    if chunk:
                        fh.write(chunk)
                        size += len(chunk)
            os.replace(partial, final)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        upload.path = final
        upload.stored_type = content_type or upload.content_type
        upload.size = size
        return Response(
            b"",
            status_code=200,
            headers={"ETag": f'"{uuid.uuid4().hex.upper()}"', "x-oss-request-id": uuid.uuid4().hex[:24]},
        )

    # -- GET /_emulator/files/<key> --------------------------------------------------------------------

    def refuse_output(self, request: Request, key: str) -> Response | None:
        """OSS's answer when an output URL's signature is missing, wrong or expired; None when valid."""
        token = request.query_params.get("Signature", "")
        expires = request.query_params.get("Expires", "")
        if not token or not expires.isdigit():
            return oss_error(403, "AccessDenied", "You have no right to access this object.")
        expected = sign_output(self.config, key, int(expires))
        if not secrets.compare_digest(token.encode(), expected.encode()):
            return _signature_mismatch(
                "The request signature we calculated does not match the signature you provided."
            )
        if self.clock.time() >= int(expires):
            return oss_error(403, "AccessDenied", "Request has expired.")
        return None

    def input_image(self, inputs: Any) -> bytes | None:
        """The bytes of the task's input image: an upload of this emulator (by its access URL) or a
        ``data:image/png;base64,`` value; None when it has none."""
        prefix = f"{self.config.public_url}/_emulator/files/"
        for value in _strings(inputs):
            if value.startswith(prefix):
                upload = self.uploads.get(value[len(prefix) :].split("?")[0])
                if upload is not None and upload.path and 0 < upload.size <= MAX_SOURCE_BYTES:
                    try:
                        with open(upload.path, "rb") as fh:
                            data = fh.read(MAX_SOURCE_BYTES + 1)
                    except OSError:
                        continue
                    if data.startswith(PNG_SIGNATURE):
                        return data
            elif value.startswith("data:image/png;base64,") and len(value) <= 2 * MAX_SOURCE_BYTES:
                try:
                    data = base64.b64decode(value.split(",", 1)[1], validate=True)
                except ValueError:
                    continue
                if data.startswith(PNG_SIGNATURE):
                    return data
        return None

    async def get(self, request: Request) -> Response:
        key = request.path_params["key"]
        if key.startswith("outputs/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2].endswith(".png"):
                task_id, variant = parts[1], parts[2][: -len(".png")]
                task = self._output_available(task_id, variant)
                if task:  # a key that does not exist is NoSuchKey, signed or not
                    refused = self.refuse_output(request, key)
                    if refused is not None:
                        return refused
                    source = self.input_image(task.inputs)
                    return Response(output_png(task_id, variant, source), media_type="image/png")
            return _no_such_key()
        upload = self.uploads.get(key)
        if upload is None or upload.path is None or not os.path.exists(upload.path):
            return _no_such_key()
        return FileResponse(upload.path, media_type=upload.stored_type or "application/octet-stream")
