"""One exception hierarchy for everything SpeedPix can raise.

Every error carries what a person needs to act on it (the operation, HTTP status, the gateway's or the
backend's error code, the request / invoke id) and a sentence saying what to do. Nothing secret goes
into a message: no app secret, no signature, no pre-signed upload URL.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowException


class SpeedPixError(AirflowException):
    """Root of every error this provider raises."""


class SpeedPixConfigError(SpeedPixError, ValueError):
    """The connection or an argument is wrong; the message names the field and the fix."""


class SpeedPixInputError(SpeedPixConfigError):
    """A value in a prediction's ``inputs`` cannot be sent; the message names its place in ``inputs``.

    ``reason`` is the message without its place, set when the same check also serves
    ``SpeedPixHook.upload_file`` (whose message starts ``upload_file:``): :meth:`at` names the input.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason

    def at(self, where: str) -> SpeedPixInputError:
        """The same error, placed at ``where`` (e.g. ``inputs['image']``)."""
        if self.reason is None:
            return self
        return SpeedPixInputError(f"{where}: {self.reason}", reason=self.reason)


class SpeedPixTransportError(SpeedPixError):
    """The request did not complete (connection refused or reset, timeout).

    ``reached_server`` is False only when the request provably never left this machine (the connection
    could not be opened): only then is a non-idempotent call safe to send again.
    """

    def __init__(self, message: str, *, operation: str, reached_server: bool) -> None:
        super().__init__(message)
        self.operation = operation
        self.reached_server = reached_server


class SpeedPixAPIError(SpeedPixError):
    """The gateway or the SpeedPix backend answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        status_code: int | None = None,
        error_code: str | None = None,
        sub_error_code: str | None = None,
        error_message: str | None = None,
        request_id: str | None = None,
        invoke_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status_code = status_code  # type: ignore[assignment]  # HTTP status, as AirflowException uses it
        self.error_code = error_code
        self.sub_error_code = sub_error_code
        self.error_message = error_message
        self.request_id = request_id
        self.invoke_id = invoke_id


class SpeedPixAuthError(SpeedPixAPIError):
    """The gateway refused the credentials or the signature (bad key/secret, clock skew, nonce reuse)."""


class SpeedPixThrottledError(SpeedPixAPIError):
    """The gateway throttled the call before it reached the backend; safe to retry, even a create."""


class SpeedPixServerError(SpeedPixAPIError):
    """The gateway or backend failed with a 5xx; reads are retried."""


class SpeedPixResponseError(SpeedPixAPIError):
    """The answer could not be read (not JSON, truncated, HTML error page, missing ``data``)."""


class SpeedPixNotFoundError(SpeedPixAPIError):
    """The workflow, version, alias or prediction does not exist."""


class _StorageError(SpeedPixError):
    """A plain storage request failed; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class SpeedPixUploadError(_StorageError):
    """Uploading a file to its pre-signed URL failed."""


class SpeedPixDownloadError(_StorageError):
    """Downloading an output file failed or its destination is unusable."""


class SpeedPixPredictionFailed(SpeedPixError):
    """The prediction ran and ended ``failed`` (or ``canceled``)."""

    def __init__(
        self, prediction_id: str, *, error_code: str | None, error_message: str | None, status: str = "failed"
    ) -> None:
        self.prediction_id = prediction_id
        self.error_code = error_code
        self.error_message = error_message
        self.status = status
        code = f" [{error_code}]" if error_code else ""
        super().__init__(
            f"SpeedPix prediction {prediction_id} {status}{code}: {error_message or 'no reason given'}"
        )


class SpeedPixTimeoutError(SpeedPixError):
    """Waiting for a prediction took longer than allowed. The prediction itself may still be running."""

    def __init__(self, prediction_id: str, *, timeout: float | None, last_status: str | None = None) -> None:
        self.prediction_id = prediction_id
        self.timeout = timeout
        self.last_status = last_status
        within = f"within {timeout:g}s" if timeout is not None else "before its deadline"
        super().__init__(
            f"SpeedPix prediction {prediction_id} did not finish {within} "
            f"(last status: {last_status or 'unknown'}). It may still be running and billing; a retry of "
            "this task reconnects to it; raise `timeout` or pick it up later with SpeedPixPredictionSensor."
        )
