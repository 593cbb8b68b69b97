"""What every part of the emulator writes on the wire: the backend envelope and plain JSON responses."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.responses import Response

JSON_TYPE = "application/json; charset=utf-8"


def request_id() -> str:
    return str(uuid.uuid4())


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(payload: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(json_bytes(payload), status_code=status_code, media_type=JSON_TYPE, headers=headers)


def envelope(
    data: Any = None,
    *,
    status: int = 10,
    err_code: str = "",
    err_message: str = "",
    sub_err_code: str = "",
    sub_err_message: str = "",
    include_data: bool = True,
) -> dict:
    """The SpeedPix backend envelope (camelCase keys); ``status`` 10 is success."""
    out = {
        "status": status,
        "errCode": err_code,
        "errMessage": err_message,
        "subErrCode": sub_err_code,
        "subErrMessage": sub_err_message,
        "apiInvokeId": str(uuid.uuid4()),
    }
    if include_data:
        out["data"] = data
    return out


def envelope_error(code: str, message: str, sub_code: str = "", data: Any = None, status: int = 20) -> dict:
    """A backend error: HTTP 200 with a non-empty ``errCode`` (and ``subErrCode`` when given)."""
    return envelope(
        data,
        status=status,
        err_code=code,
        err_message=message,
        sub_err_code=sub_code,
        sub_err_message=message if sub_code else "",
    )


def invalid_parameter(message: str, sub_code: str = "INVALID_PARAMETER") -> dict:
    return envelope_error("InvalidParameter", message, sub_code)
