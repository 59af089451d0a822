"""The study store: instances on disk as received, their header index, run folders.

No Airflow import here: the listener and the sensor share it.
"""

from .errors import InvalidUID, StoreError
from .header import InstanceHeader, read_header
from .index import RunRef, StoredInstance, StudyIndex, run_id_for
from .layout import DataDir
from .snapshot import snapshot
from .study_store import IngestResult, StudyStore

__all__ = [
    "InvalidUID", "StoreError", "InstanceHeader", "read_header", "RunRef", "StoredInstance",
    "StudyIndex", "run_id_for", "DataDir", "snapshot", "IngestResult", "StudyStore",
]
