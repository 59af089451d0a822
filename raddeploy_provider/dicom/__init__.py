"""DICOM networking shared by the send hook and the CLI (no Airflow import)."""
