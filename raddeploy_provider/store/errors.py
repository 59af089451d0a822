"""Errors of the study store."""


class StoreError(Exception):
    """An instance or a run folder the store refuses; the message says why and what to do."""


class InvalidUID(StoreError):
    """A UID that is not a DICOM UID (and so must never become part of a path)."""


class OtherPatient(StoreError):
    """An instance whose Patient ID is not that of the study's instances: it does not join the study.

    Permanent for the instance as it is (resending it won't help). The message names UIDs only,
    never a Patient ID or name: it goes into the listener's log.
    """

    def __init__(self, study_uid: str, sop_uid: str) -> None:
        super().__init__(f"instance {sop_uid} has another Patient ID than the instances of study {study_uid} "
                         "already stored: not added to that study (correct its Patient ID, or its Study "
                         "Instance UID, and send it again)")
        self.study_uid = study_uid
        self.sop_uid = sop_uid


class IndexUnavailable(Exception):
    """The study index cannot do it now: SQLite locked or its disk full, PostgreSQL unreachable,
    out of connections or refusing. Nothing was committed; the same call may succeed later (the
    listener answers "out of resources", so the sender keeps the instance and sends it again).
    The message names the index (never its password) and the backend's reason."""
