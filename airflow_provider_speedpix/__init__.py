"""Apache Airflow provider for SpeedPix (Alibaba Cloud Intelligent Creation Workshop)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_MODULE = "airflow_provider_speedpix"


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
                "external-doc-url": "https://help.aliyun.com/",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": "SpeedPix", "python-modules": [f"{_MODULE}.hooks.speedpix"]}],
        "operators": [{"integration-name": "SpeedPix", "python-modules": [f"{_MODULE}.operators.speedpix"]}],
        "sensors": [{"integration-name": "SpeedPix", "python-modules": [f"{_MODULE}.sensors.speedpix"]}],
        "triggers": [{"integration-name": "SpeedPix", "python-modules": [f"{_MODULE}.triggers.speedpix"]}],
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
                    },
                },
                "conn-fields": {
                    "resource_config_id": {
                        "label": "Resource config ID",
                        "description": "Dedicated compute to run on; empty means shared compute.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "timeout": {
                        "label": "Request timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 30, "minimum": 1},
                    },
                    "retry_limit": {
                        "label": "Attempts per call",
                        "description": "Transient failures (network, 5xx, throttling) are retried up to this.",
                        "schema": {"type": ["integer", "null"], "default": 5, "minimum": 1},
                    },
                    "retry_delay": {
                        "label": "First retry delay (s)",
                        "schema": {"type": ["number", "null"], "default": 1, "minimum": 0},
                    },
                    "retry_max_delay": {
                        "label": "Longest retry delay (s)",
                        "schema": {"type": ["number", "null"], "default": 30, "minimum": 0},
                    },
                },
            }
        ],
    }
