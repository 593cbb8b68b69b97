"""Apache Airflow provider for SpeedPix (Alibaba Cloud Intelligent Creation Workshop)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_MODULE = "airflow_provider_speedpix"
#: SpeedPix's API reference (Alibaba Cloud help center), "Submit a workflow task - comfy_prompt"
API_REFERENCE_URL = "https://help.aliyun.com/en/document_detail/2844525.html"


def get_provider_info() -> dict[str, Any]:
    """What Airflow's providers manager reads through the ``apache_airflow_provider`` entry point."""
    return {
        "package-name": "airflow-provider-speedpix",
        "name": "SpeedPix",
        "description": "Run SpeedPix (Alibaba Cloud AI image workflow) predictions from Airflow.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "SpeedPix",
                # the SpeedPix (AI Creation Workshop) API reference, starting at "Submit a workflow task"
                "external-doc-url": API_REFERENCE_URL,
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": "SpeedPix", "python-modules": [f"{_MODULE}.hooks.speedpix"]}],
        "operators": [
            {
                "integration-name": "SpeedPix",
                "python-modules": [f"{_MODULE}.operators.speedpix", f"{_MODULE}.operators.batch"],
            }
        ],
        "sensors": [{"integration-name": "SpeedPix", "python-modules": [f"{_MODULE}.sensors.speedpix"]}],
        "triggers": [
            {
                "integration-name": "SpeedPix",
                "python-modules": [f"{_MODULE}.triggers.speedpix", f"{_MODULE}.triggers.batch"],
            }
        ],
        # "SpeedPix outputs" and "SpeedPix console" on both operators (links.py)
        "extra-links": [f"{_MODULE}.links.SpeedPixOutputsLink", f"{_MODULE}.links.SpeedPixConsoleLink"],
        "connection-types": [
            {
                "connection-type": "speedpix",
                "hook-class-name": f"{_MODULE}.hooks.speedpix.SpeedPixHook",
                "hook-name": "SpeedPix",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "extra"],
                    "relabeling": {"host": "Endpoint", "login": "App Key", "password": "App Secret"},
                    "placeholders": {
                        "host": "https://openai.edu-aliyun.com",
                        "login": "app_key from the SpeedPix console",
                        "password": "app_secret",
                        "resource_config_id": "empty: shared compute",
                        "timeout": "30",
                        "retry_limit": "5",
                        "retry_delay": "1",
                        "retry_max_delay": "30",
                    },
                },
                # No schema "default"s: Airflow 3.2+ pre-fills a field with its default and then saves it
                # into `extra`, so an unchanged connection would stop following the provider's defaults.
                # An empty field means the default, which each description states.
                "conn-fields": {
                    "resource_config_id": {
                        "label": "Resource config ID",
                        "description": "Dedicated compute to run on (from the SpeedPix console); several as "
                        "`a,b` are tried in order. Empty: shared compute.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "timeout": {
                        "label": "Request timeout (s)",
                        "description": "Longest wait for one HTTP request, not for the whole prediction "
                        "(that is the operator's `timeout`). Empty: 30.",
                        "schema": {"type": ["number", "null"], "minimum": 1},
                    },
                    "retry_limit": {
                        "label": "Attempts per call",
                        "description": "Transient failures (network, 5xx, throttling) are retried up to this "
                        "many attempts in all. Empty: 5.",
                        "schema": {"type": ["integer", "null"], "minimum": 1},
                    },
                    "retry_delay": {
                        "label": "First retry delay (s)",
                        "description": "Wait before the first retry; it doubles on each retry, with jitter. "
                        "Empty: 1.",
                        "schema": {"type": ["number", "null"], "minimum": 0},
                    },
                    "retry_max_delay": {
                        "label": "Longest retry delay (s)",
                        "description": "Cap on the wait between two retries. Empty: 30.",
                        "schema": {"type": ["number", "null"], "minimum": 0},
                    },
                },
            }
        ],
    }
