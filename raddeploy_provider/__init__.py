"""raddeploy-provider: run a clinic's AI models on the DICOM it pushes, through Airflow.

``get_provider_info`` is what Airflow's provider manager reads (entry point
``apache_airflow_provider``). Importing this package imports no Airflow.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raddeploy-provider")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def get_provider_info() -> dict:
    return {
        "package-name": "raddeploy-provider",
        "name": "RadDeploy",
        "description": "DICOM-triggered medical AI model runs: fingerprint sensor, model containers "
                       "with GPU leases, DICOM send.",
        "versions": [__version__],
        "hooks": [{"integration-name": "DICOM", "python-modules": ["raddeploy_provider.hooks.dicom"]}],
        "operators": [{"integration-name": "DICOM", "python-modules": [
            "raddeploy_provider.operators.model", "raddeploy_provider.operators.dicom_send"]}],
        "sensors": [{"integration-name": "DICOM", "python-modules": ["raddeploy_provider.sensors.fingerprint"]}],
        "integrations": [{"integration-name": "DICOM", "external-doc-url": "https://www.dicomstandard.org/",
                          "tags": ["protocol"]}],
        "connection-types": [{
            "connection-type": "dicom",
            "hook-class-name": "raddeploy_provider.hooks.dicom.DicomHook",
            "hook-name": "DICOM node",
            "conn-fields": {
                "ae_title": {"label": "Called AE title", "schema": {"type": ["string", "null"]}},
                "calling_ae_title": {"label": "Calling AE title", "schema": {"type": ["string", "null"]}},
            },
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "login", "password"],
                "relabeling": {"host": "Host", "port": "Port"},
                "placeholders": {"host": "pacs.hospital.local", "port": "104"},
            },
        }],
    }
