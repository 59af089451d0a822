"""What Airflow's provider manager reads (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from raddeploy_provider import __version__


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
        "triggers": [{"integration-name": "DICOM", "python-modules": ["raddeploy_provider.triggers.study_ready"]}],
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
