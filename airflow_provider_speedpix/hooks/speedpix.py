"""SpeedPixHook: the public API a DAG author calls, top to bottom.

Connection settings live in :mod:`_settings`, the HTTP funnel in :mod:`_transport`, the retry policy
in :mod:`_retry`, file I/O in :mod:`_storage`, what an outcome means in :mod:`_outcome`, and the
waiting rules in :mod:`_polling`. This module only wires them together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix import _storage, _transport
from airflow_provider_speedpix._inputs import InputPreparer, check_strategy
from airflow_provider_speedpix._outcome import (
    MAX_CONSECUTIVE_ERRORS,
    check_positive,
    check_prediction_id,
    raise_for_prediction,
)
from airflow_provider_speedpix._polling import PollLoop, settle
from airflow_provider_speedpix._protocol import Prediction, UploadedFile
from airflow_provider_speedpix._retry import should_retry, within
from airflow_provider_speedpix._settings import (
    DEFAULT_ENDPOINT,
    DEFAULT_RETRY_DELAY,
    DEFAULT_RETRY_LIMIT,
    DEFAULT_RETRY_MAX_DELAY,
    ENV_ENDPOINT,
    ENV_KEY,
    ENV_SECRET,
    REQUEST_TIMEOUT,
    SpeedPixSettings,
    connection_form_widgets,
    connection_type,
    normalise_endpoint,
    settings_from_connection,
    settings_from_env,
)
from airflow_provider_speedpix._transport import MAX_RESPONSE_BYTES, shared_async_client
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixAuthError,
    SpeedPixConfigError,
    SpeedPixError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
    SpeedPixTimeoutError,
    SpeedPixTransportError,
)

#: Old name of :data:`REQUEST_TIMEOUT` (seconds per request), kept for callers that import it.
DEFAULT_TIMEOUT = REQUEST_TIMEOUT
DEFAULT_POLL_INTERVAL = 2.0


class SpeedPixHook(BaseHook):
    """Talk to SpeedPix with an Airflow connection of type ``speedpix``.

    Host = endpoint (``https://openai.edu-aliyun.com`` by default; a bare host means https), Login = app_key,
    Password = app_secret. Extras: ``resource_config_id``, ``timeout`` (seconds per request),
    ``retry_limit`` (attempts), ``retry_delay`` and ``retry_max_delay`` (backoff, seconds). Without the
    connection, ``SPEEDPIX_APP_KEY`` / ``SPEEDPIX_APP_SECRET`` / ``SPEEDPIX_ENDPOINT`` are used.

    :param speedpix_conn_id: the Airflow connection to use.
    """

    conn_name_attr = "speedpix_conn_id"
    default_conn_name = "speedpix_default"
    conn_type = "speedpix"
    hook_name = "SpeedPix"

    def __init__(self, speedpix_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.speedpix_conn_id = speedpix_conn_id
        self._settings: SpeedPixSettings | None = None
        self._session: requests.Session | None = None

    # ------------------------------------------------------------------ connection form (3.0 / 3.1)
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields for the Airflow 3.0/3.1 form, built from the ``conn-fields`` 3.2+ reads."""
        return connection_form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel host/login/password and hide what SpeedPix does not use."""
        return connection_type()["ui-field-behaviour"]

    # ------------------------------------------------------------------ settings and session
    @property
    def settings(self) -> SpeedPixSettings:
        """Resolved once per hook: the connection, else the environment."""
        if self._settings is None:
            try:
                conn = self.get_connection(self.speedpix_conn_id)
            except AirflowNotFoundException:
                conn = None  # fall back below, outside the handler: no chained not-found traceback
            if conn is None:
                self._settings = settings_from_env(self.speedpix_conn_id)
            else:
                self._settings = settings_from_connection(conn, conn.extra_dejson, self.speedpix_conn_id)
        return self._settings

    async def asettings(self) -> SpeedPixSettings:
        """The same, without blocking the event loop (for triggers)."""
        if self._settings is None:
            from airflow.providers.common.compat.connection import (
                get_async_connection,
                get_async_extra_dejson,
            )

            try:
                conn = await get_async_connection(self.speedpix_conn_id)
            except AirflowNotFoundException:
                conn = None  # fall back below, outside the handler: no chained not-found traceback
            if conn is None:
                self._settings = settings_from_env(self.speedpix_conn_id)
            else:
                extra = await get_async_extra_dejson(conn)
                self._settings = settings_from_connection(conn, extra, self.speedpix_conn_id)
        return self._settings

    def get_conn(self) -> requests.Session:
        """The hook's ``requests.Session`` (keep-alive across calls)."""
        if self._session is None:
            self._session = _transport.new_session(self.settings.endpoint)
        return self._session

    def _call(
        self,
        operation: str,
        payload: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        allow_failure: bool = False,
    ) -> proto.Envelope:
        return _transport.call(
            self.get_conn(),
            self.settings,
            operation,
            payload,
            headers=headers,
            allow_failure=allow_failure,
            log=self.log,
        )

    async def _acall(
        self, operation: str, payload: Mapping[str, Any], *, allow_failure: bool = False
    ) -> proto.Envelope:
        settings = self._settings or await self.asettings()
        return await _transport.acall(settings, operation, payload, allow_failure=allow_failure, log=self.log)

    # ------------------------------------------------------------------ files
    def upload_file(
        self, source: Any, *, filename: str | None = None, content_type: str | None = None
    ) -> UploadedFile:
        """Upload a path, binary file object or ``ObjectStoragePath``; returns its ``access_url``.

        The bytes are streamed to the pre-signed URL, so memory does not grow with the file size.
        """

        def sign(content_type: str, filename: str) -> tuple[str, dict[str, Any]]:
            payload = {"contentType": content_type, "originalFilename": filename}
            return proto.parse_upload_sign(self._call(proto.UPLOAD_SIGN, payload))

        return _storage.upload(
            self.get_conn(),
            self.settings,
            source,
            sign,
            filename=filename,
            content_type=content_type,
            log=self.log,
        )

    def download(self, url: str, destination: Any) -> Any:
        """Stream ``url`` to ``destination`` (a file path, a directory, or an ``ObjectStoragePath``).

        A destination that is an existing directory (or ends with ``/``) gets the URL's file name, made
        safe: a server-provided name can never write outside that directory. Returns the written path.
        """
        return _storage.download(self.get_conn(), self.settings, url, destination, self.log)

    # ------------------------------------------------------------------ predictions
    def create_prediction(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any],
        *,
        alias_id: str | None = None,
        version_id: str | None = None,
        resource_config_id: str | None = None,
        randomise_seeds: bool | None = None,
        return_temp_files: bool | None = None,
        file_encoding_strategy: str = "url",
    ) -> Prediction:
        """Start a prediction (billed). Local files in ``inputs`` are uploaded or inlined first.

        Retried only where the request provably did not reach the backend, so it never creates two.
        """
        check_strategy(file_encoding_strategy)
        resource = resource_config_id or self.settings.resource_config_id or "default"
        if not resource.isascii() or not resource.isprintable():
            raise SpeedPixConfigError(
                f"`resource_config_id` {resource!r} must be printable ASCII (it is sent as a header); copy "
                "it from the SpeedPix console."
            )
        proto.check_workflow_reference(workflow_id, alias_id=alias_id, version_id=version_id)
        preparer = InputPreparer(
            lambda src, name, where: self.upload_file(src, filename=name).access_url, file_encoding_strategy
        )
        body = proto.create_prediction_body(
            workflow_id,
            preparer.prepare(inputs),
            alias_id=alias_id,
            version_id=version_id,
            randomise_seeds=randomise_seeds,
            return_temp_files=return_temp_files,
        )
        envelope = self._call(proto.CREATE, body, headers={"X-SP-RESOURCE-CONFIG-ID": resource})
        prediction = proto.parse_created(envelope)
        self.log.info(
            "Created SpeedPix prediction %s (workflow %s, estimated %ss, invoke id %s)",
            prediction.id,
            body["workflow_id"],
            prediction.estimated_duration,
            prediction.invoke_id,
        )
        return prediction

    def get_prediction(self, prediction_id: str, *, time_left: float | None = None) -> Prediction:
        """Status, progress (fraction 0..1), ETA, queue position and node progress; once finished also the
        output, the default images and the timing (or the error code and message).

        Finished means a definite answer (:func:`_polling.settle`): a result not ready yet reads as
        ``running``. ``time_left`` bounds the whole call (requests, retries, backoff) in seconds.
        """
        payload = {"taskId": check_prediction_id(prediction_id)}
        with within(time_left):
            prediction = proto.parse_progress(prediction_id, self._call(proto.PROGRESS, payload))
            if prediction.finished:
                settle(prediction, self._call(proto.RESULT, payload, allow_failure=True))
        return prediction

    async def aget_prediction(self, prediction_id: str, *, time_left: float | None = None) -> Prediction:
        """:meth:`get_prediction` for the event loop (used by the trigger). Past ``time_left`` it raises
        a transient :class:`SpeedPixTransportError`, even while waiting for a free connection."""
        payload = {"taskId": check_prediction_id(prediction_id)}
        if time_left is None:
            return await self._apoll(prediction_id, payload)
        with within(time_left):
            try:
                return await asyncio.wait_for(
                    self._apoll(prediction_id, payload), timeout=max(time_left, 0.0)
                )
            except TimeoutError:
                raise SpeedPixTransportError(
                    f"SpeedPix {proto.PROGRESS}: no answer within the {time_left:.1f}s left before the "
                    "deadline.",
                    operation=proto.PROGRESS,
                    reached_server=True,
                ) from None

    async def _apoll(self, prediction_id: str, payload: Mapping[str, Any]) -> Prediction:
        """One status call, and the result call once it says finished (a method, not a closure: a
        triggerer keeps thousands of these alive)."""
        prediction = proto.parse_progress(prediction_id, await self._acall(proto.PROGRESS, payload))
        if prediction.finished:
            settle(prediction, await self._acall(proto.RESULT, payload, allow_failure=True))
        return prediction

    def wait_for_prediction(
        self,
        prediction_id: str,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | None = None,
        max_poll_interval: float | None = None,
        on_update: Callable[[Prediction], None] | None = None,
        estimated_duration: float | None = None,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
    ) -> Prediction:
        """Block until the prediction finishes; raise on failure or after ``timeout`` seconds.

        The trigger's twin (same :class:`_polling.PollLoop`): up to ``max_consecutive_errors`` failed
        polls in a row (each already retried) are sat out; the last one is raised.
        """
        check_positive("poll_interval", poll_interval)
        if timeout is not None:
            check_positive("timeout", timeout)
        started = time.monotonic()
        loop = PollLoop(
            poll_interval=poll_interval,
            max_interval=max_poll_interval or poll_interval * 10,
            deadline=None if timeout is None else started + timeout,
            created_at=started,
            estimated_duration=estimated_duration,
            max_consecutive_errors=max_consecutive_errors,
            not_found_grace=0.0,  # created_at here is when the wait began, not the creation
        )
        while True:
            try:
                prediction = self.get_prediction(prediction_id, time_left=loop.poll_budget(time.monotonic()))
            except SpeedPixError as err:
                step = loop.failed(err, time.monotonic())
                if step.action in ("sleep", "timeout"):
                    self.log.warning(
                        "Polling prediction %s failed (%s); next try in %.1fs", prediction_id, err, step.delay
                    )
            else:
                if on_update is not None:
                    on_update(prediction)
                step = loop.answered(prediction, time.monotonic())
            if step.prediction is not None:  # done
                return raise_for_prediction(step.prediction)
            if step.action in ("error", "gave_up"):
                raise step.error  # type: ignore[misc]
            if step.action == "sleep" or step.delay > 0:
                time.sleep(step.delay)
            if step.action == "timeout":
                raise SpeedPixTimeoutError(prediction_id, timeout=timeout, last_status=loop.last_status)

    def run(self, workflow_id: str, inputs: Mapping[str, Any], *, wait: bool = True, **options: Any) -> Any:
        """Like the SDK's ``client.run``: the output dict, or the :class:`Prediction` when ``wait=False``.

        A workflow without custom output fields (empty ``result``) returns its default images as
        ``{"images": [url, ...]}`` instead of nothing (:attr:`Prediction.output_or_images`).

        ``options`` are :meth:`create_prediction`'s keywords plus ``poll_interval`` and ``timeout``.
        """
        wait_options = {
            k: options.pop(k) for k in ("poll_interval", "timeout", "max_poll_interval") if k in options
        }
        prediction = self.create_prediction(workflow_id, inputs, **options)
        if not wait:
            return prediction
        return self.wait_for_prediction(
            prediction.id, estimated_duration=prediction.estimated_duration, **wait_options
        ).output_or_images

    # ------------------------------------------------------------------ connection test
    def test_connection(self) -> tuple[bool, str]:
        """Make one real signed call and say, in the user's words, whether SpeedPix accepted the credentials.

        The probe reads the status of a task that does not exist: free, creates nothing. Its "no such
        task" answer means the gateway accepted the signature. Messages name the endpoint, the error code
        and the field to fix, never an internal operation name, the secret or a signature.
        """
        try:
            settings = self.settings
        except SpeedPixError as err:
            return False, f"The connection is not usable yet: {err}"
        where = f"SpeedPix at {settings.endpoint}"
        try:
            self._call(proto.PROGRESS, {"taskId": "airflow-connection-test"})
        except SpeedPixAuthError as err:
            return False, (
                f"{where} rejected the credentials{_code(err)}. Check the App Key and the App Secret "
                "(copy both from the SpeedPix console), and that this machine's clock is right."
            )
        except SpeedPixThrottledError as err:
            return False, (
                f"{where} is throttling requests right now{_code(err)}, so the credentials could not be "
                "checked. Try again in a minute."
            )
        except SpeedPixServerError as err:
            return False, (
                f"{where} answered with a server error{_code(err)}, so the credentials could not be "
                "checked. Try again later."
            )
        except SpeedPixResponseError:
            return False, (
                f"{settings.endpoint} answered, but not as SpeedPix does. Check the Endpoint: it should be "
                f"{DEFAULT_ENDPOINT} (or your emulator's address), with no path."
            )
        except SpeedPixAPIError:
            pass  # a SpeedPix answer to the probe (no such task): the gateway accepted the credentials
        except SpeedPixError:
            return False, (
                f"Could not reach {where}. Check the Endpoint and this machine's network and proxy settings."
            )
        return True, f"Connected to {where}: the credentials were accepted."


def _code(err: SpeedPixAPIError) -> str:
    """`` (HTTP 400, I400SG: Invalid Signature)`` from what the gateway said, without internal names."""
    parts = [f"HTTP {err.status_code}" if err.status_code else "", err.error_code or ""]
    said = ", ".join(part for part in parts if part)
    if err.error_message:
        said = f"{said}: {err.error_message}" if said else err.error_message
    return f" ({said})" if said else ""


__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_RETRY_DELAY",
    "DEFAULT_RETRY_LIMIT",
    "DEFAULT_RETRY_MAX_DELAY",
    "DEFAULT_TIMEOUT",
    "ENV_ENDPOINT",
    "ENV_KEY",
    "ENV_SECRET",
    "MAX_RESPONSE_BYTES",
    "REQUEST_TIMEOUT",
    "SpeedPixHook",
    "SpeedPixSettings",
    "check_positive",
    "normalise_endpoint",
    "raise_for_prediction",
    "shared_async_client",
    "should_retry",
]
