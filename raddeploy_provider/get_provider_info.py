"""What Airflow's provider manager reads (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from raddeploy_provider import __version__
from raddeploy_provider.hooks.dicom_node import FIELDS


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
            # Airflow 3.2+ reads the form from here (the hook's form methods are deprecated): each
            # field's schema as JSON schema, its label as the title; stored in extra under its name.
            "conn-fields": {field.name: {"label": field.label, "description": field.description,
                                         "schema": field.schema()} for field in FIELDS},
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "login", "password"],
                "relabeling": {"host": "Host", "port": "Port"},
                "placeholders": {"host": "pacs.hospital.local", "port": "104",
                                 **{field.name: field.placeholder for field in FIELDS if field.placeholder}},
            },
        }],
    }
