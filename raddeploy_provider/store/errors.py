"""Errors of the study store."""


class StoreError(Exception):
    """An instance or a run folder the store refuses; the message says why and what to do."""


class InvalidUID(StoreError):
    """A UID that is not a DICOM UID (and so must never become part of a path)."""
