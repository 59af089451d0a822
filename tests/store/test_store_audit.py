"""The audit trail: records in the index, append-only on both backends, nothing but UIDs, the export."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from raddeploy_provider.store import NEVER, StoredInstance, StudyIndex, audit
from raddeploy_provider.store.audit import AuditError, AuditRecord

STUDY = "1.2.826.0.1.7"


def inst(n: int) -> StoredInstance:
    return StoredInstance(
        sop_uid=f"1.2.7.{n}", study_uid=STUDY, series_uid="1.2.7", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", path=f"studies/{STUDY}/1.2.7/1.2.7.{n}.dcm", size=10, sha256="",
        received_at=time.time(), tags={"Modality": "CT", "PatientName": "Doe^Jane", "PatientID": "PID-77"},
        calling_ae="CT_SCANNER", peer="10.1.2.3:4000")


@pytest.fixture
def index(index_url: str | None, tmp_path: Path) -> StudyIndex:
    idx = StudyIndex(index_url or tmp_path / "index.sqlite3")
    yield idx
    idx.close()


def test_a_run_opened_is_recorded_with_its_instance_in_the_same_transaction(index: StudyIndex) -> None:
    index.add(inst(1), {"flow_a": NEVER, "flow_b": NEVER})
    index.add(inst(2), {"flow_a": NEVER})  # the run is open: nothing new
    opened = [r for r in index.audit_records() if r.event == "run_opened"]
    assert [(r.dag_id, r.run_id, r.actor, r.peer) for r in opened] == [
        ("flow_a", f"{STUDY}.1", "CT_SCANNER", "10.1.2.3"), ("flow_b", f"{STUDY}.1", "CT_SCANNER", "10.1.2.3")]
    assert opened[0].detail == {"generation": 1, "sop_uids": ["1.2.7.1"]}
    assert all(r.study_uid == STUDY and r.at and r.id for r in opened)


def test_records_cannot_be_changed_or_deleted(index: StudyIndex, index_backend: str) -> None:
    index.record_audit(AuditRecord("association", actor="CT", peer="10.0.0.1", detail={"stored": 3}))
    errors: tuple[type[BaseException], ...]
    if index_backend == "sqlite":
        errors = (sqlite3.IntegrityError,)
    else:
        import psycopg
        errors = (psycopg.errors.RaiseException,)
    for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit"):
        with pytest.raises(errors, match="append-only"):
            with index._tx() as db:
                db.execute(statement)
    if index_backend == "postgresql":
        with pytest.raises(errors, match="append-only"):
            with index._tx() as db:
                db.execute("TRUNCATE audit")
    assert [r.actor for r in index.audit_records()] == ["CT"]


def test_a_record_takes_only_the_listed_fields() -> None:
    with pytest.raises(AuditError, match="'patient_name' is not allowed"):
        AuditRecord("send", detail={"patient_name": "Doe^Jane"})
    with pytest.raises(AuditError, match="no audit event"):
        AuditRecord("coffee")
    with pytest.raises(AuditError, match="no audit outcome"):
        AuditRecord("send", outcome="meh")


def test_filters_by_time_and_study(index: StudyIndex) -> None:
    index.add(inst(1), {"flow": NEVER})
    index.record_audit(AuditRecord("association", actor="OTHER", study_uid=""))
    assert [r.event for r in index.audit_records(study_uid=STUDY)] == ["run_opened"]
    assert index.audit_records(since=time.time() + 60) == []
    assert len(index.audit_records(since=time.time() - 60)) == 2


def test_the_export_writes_each_record_once_and_holds_no_patient_data(index: StudyIndex, tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    index.add(inst(1), {"flow": NEVER})
    assert audit.export(index, folder) == 1
    index.record_audit(AuditRecord("send", study_uid=STUDY, peer="PACS@pacs:104", detail={"accepted": 1}))
    assert audit.export(index, folder) == 1
    assert audit.export(index, folder) == 0  # nothing new: nothing written twice
    files = sorted(folder.glob("audit-*.jsonl"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["run_opened", "send"]
    assert lines[1]["outcome_code"] == 0 and lines[1]["time"].endswith("Z")
    text = "".join(f.read_text() for f in files)
    assert "Doe" not in text and "PID-77" not in text


def test_every_event_and_detail_is_documented() -> None:
    assert all(e.doc and e.atna for e in audit.EVENTS.values())
    assert all(DOC for DOC in audit.DETAIL_KEYS.values())
