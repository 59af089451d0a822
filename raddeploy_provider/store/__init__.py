"""The study store: instances on disk as received, their header index, run folders.

No Airflow import here: the listener and the sensor share it.
"""

from .errors import IndexUnavailable, InvalidUID, StoreError
from .header import InstanceHeader, read_header
from .index import NEVER, RunRef, StoredInstance, StudyIndex, run_id_for
from .layout import SOURCE_MOUNT, DataDir, RunDir
from .snapshot import snapshot
from .study_store import IngestResult, StudyStore

__all__ = [
    "IndexUnavailable", "InvalidUID", "StoreError", "InstanceHeader", "read_header", "NEVER", "RunRef",
    "StoredInstance", "StudyIndex", "run_id_for", "SOURCE_MOUNT", "DataDir", "RunDir", "snapshot", "IngestResult",
    "StudyStore",
]
