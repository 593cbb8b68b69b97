"""The gallery in a real browser: headless Chromium against a real api-server after an example DAG ran.

A deployment from ``tests/e2e/deployment.py`` (api-server, scheduler, dag-processor, triggerer, emulator)
runs the white-background example's task (plus one failing workflow); Chromium (Debian's ``chromium``, installed by
``scripts/install_chromium.sh`` when missing) logs in through Airflow's own login route, opens the
gallery page, and the test reads over the DevTools protocol that every thumbnail decoded
(``complete`` and ``naturalWidth > 0``) and that the page names the prediction. The screenshot is kept
as ``docs/img/gallery.png``; the same run shown inside Airflow's UI (the "SpeedPix images" tab of the DAG
run) as ``docs/img/gallery-in-airflow.png``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.deployment import ROOT, Deployment

pytestmark = pytest.mark.e2e

DAG_ID = "speedpix_gallery_browser"
VIEWER, VIEWER_PASSWORD = "gallery-viewer", "viewer-" + __import__("secrets").token_hex(8)
SCREENSHOT = ROOT / "docs" / "img" / "gallery.png"
UI_SCREENSHOT = ROOT / "docs" / "img" / "gallery-in-airflow.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1280,800",
]


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], check=True, timeout=900)
        found = shutil.which("chromium")
    assert found, "chromium could not be installed (scripts/install_chromium.sh)"
    return found


class Browser:
    """One headless Chromium page driven over the DevTools protocol (``websockets``, shipped with uvicorn)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str, context_id: int | None = None) -> Any:
        params: dict[str, Any] = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.call("Runtime.evaluate", **params)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, context_id: int | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, context_id)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r} (last value {value!r})")
            time.sleep(0.3)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


@contextlib.contextmanager
def headless_chromium() -> Iterator[Browser]:
    profile = tempfile.mkdtemp(prefix="speedpix-chromium-")
    proc = subprocess.Popen(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t["type"] == "page"]
        browser = Browser(pages[0]["webSocketDebuggerUrl"])
        browser.call("Page.enable")
        browser.call("Runtime.enable")
        yield browser
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


#: The example's task (product photo to white background, with the workflow's temporary outputs) waiting in
#: the worker, next to a workflow that fails, so the page shows images and a failure. (The deferrable
#: example itself runs in a real deployment in ``test_example_deferrable.py``.)
GALLERY_DAG = """
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

PRODUCT = {product!r}

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         doc_md="The gallery's browser test (tests/e2e/test_gallery_browser.py).") as dag:
    SpeedPixRunOperator(
        task_id="white_background", workflow_id="wf-white-background", alias_id="main",
        inputs={{"text": "A bright product shot on a pure white background", "image": PRODUCT}},
        return_temp_files=True, output_dir={out!r} + "/{{{{ run_id | replace(':', '_') | replace('+', '_') }}}}",
        deferrable=False, poll_interval=0.5, timeout=300,
    )
    SpeedPixRunOperator(
        task_id="retouch", workflow_id="wf-fail", inputs={{"text": "retouch", "image": PRODUCT}},
        deferrable=False, poll_interval=0.5, timeout=300,
    )
"""


@pytest.fixture(scope="module")
def finished_run() -> Iterator[tuple[Deployment, str]]:
    # Real logins instead of the suite's "everyone is admin" (which lets anonymous requests through): one
    # read-only user, so the test goes through Airflow's login and its session cookie.
    secrets_dir = Path(tempfile.mkdtemp(prefix="speedpix-gallery-users-"))
    (secrets_dir / "passwords.json").write_text(json.dumps({VIEWER: VIEWER_PASSWORD}))
    auth = {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{VIEWER}:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(secrets_dir / "passwords.json"),
    }
    with Deployment(emulator_duration=2.0, extra_env=auth) as deployment:
        out = deployment.home / "gallery-output"
        source = GALLERY_DAG.format(
            product=str(ROOT / "dags_examples" / "data" / "product.png"), dag_id=DAG_ID, out=str(out)
        )
        (deployment.dags / f"{DAG_ID}.py").write_text(source, encoding="utf-8")
        deployment.wait_for_dags([DAG_ID])
        run_id = deployment.trigger(DAG_ID)
        state = deployment.wait_for_run(DAG_ID, run_id, timeout=240)
        assert state == "failed", deployment.log_tails()  # "retouch" fails by design
        assert deployment.task_states(DAG_ID, run_id) == {"success": 1, "failed": 1}
        yield deployment, run_id
    shutil.rmtree(secrets_dir, ignore_errors=True)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


IMAGES_JS = """JSON.stringify(Array.from(document.querySelectorAll('img.thumb')).map(
    i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, src: i.getAttribute('src')})))"""


def test_gallery_renders_the_runs_images_in_chromium(finished_run):
    deployment, run_id = finished_run
    gallery = f"/speedpix/gallery/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}"
    anonymous = urllib.request.Request(f"{deployment.api_url}{gallery}", headers={"Accept": "text/html"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(NoRedirect()).open(anonymous, timeout=30)
    assert refused.value.code == 307 and "/auth/login" in refused.value.headers["location"]
    with pytest.raises(urllib.error.HTTPError) as unauthenticated:
        urllib.request.urlopen(f"{deployment.api_url}{gallery}/thumb/white_background/-1/0", timeout=30)
    assert unauthenticated.value.code == 401
    # Airflow's own login (the simple auth manager's token endpoint) gives the session the UI uses
    login = urllib.request.Request(
        f"{deployment.api_url}/auth/token",
        data=json.dumps({"username": VIEWER, "password": VIEWER_PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(login, timeout=30) as response:
        token = json.load(response)["access_token"]
    with headless_chromium() as browser:
        browser.call("Network.enable")
        browser.call("Network.setCookie", name="_token", value=token, url=deployment.api_url, path="/")
        browser.call("Page.navigate", url=f"{deployment.api_url}{gallery}")
        browser.wait_for(f"location.pathname === {json.dumps(gallery)} && document.readyState === 'complete'")
        try:
            browser.wait_for(
                f"(() => {{ const l = JSON.parse({IMAGES_JS}); return l.length && l.every(i => i.complete); }})()"
            )
        except AssertionError:
            raise AssertionError(
                f"{browser.evaluate(IMAGES_JS)}\n{browser.evaluate('document.body.innerText')}"
            ) from None
        images = json.loads(browser.evaluate(IMAGES_JS))
        assert len(images) == 3, images  # output, subject_image, mask_image
        assert all(image["width"] > 0 and image["height"] > 0 for image in images), images
        text = browser.evaluate("document.body.innerText")
        prediction_ids = deployment.query(
            "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = 'prediction_id'",
            (DAG_ID, run_id),
        )
        assert len(prediction_ids) == 2
        assert all(json.loads(value) in text for (value,) in prediction_ids)
        assert "succeeded" in text and "wf-white-background" in text
        assert "WORKFLOW_EXECUTION_FAILED" in text and "wf-fail" in text
        browser.screenshot(SCREENSHOT)

        # the same gallery as Airflow's UI shows it: the DAG run's "SpeedPix images" tab (an iframe)
        ui = f"{deployment.api_url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}/plugin/speedpix_images_run"
        browser.call("Page.navigate", url=ui)
        frame = browser.wait_for(
            "Array.from(document.querySelectorAll('iframe')).map(f => f.src).find(s => s.includes('/speedpix/')) || null",
            timeout=90,
        )
        assert "/speedpix/gallery/dags/" in frame
        time.sleep(3)  # let the iframe paint its thumbnails
        browser.screenshot(UI_SCREENSHOT)

    from airflow_provider_speedpix import _png

    shot = _png.decode(SCREENSHOT.read_bytes(), max_pixels=4096 * 4096)
    assert shot.width == 1280 and shot.height > 400
