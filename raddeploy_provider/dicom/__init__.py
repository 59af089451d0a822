"""DICOM shared by the store, the flows, the send hook and the CLI (no Airflow import): networking, codecs, the data dictionary."""
