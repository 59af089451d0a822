"""The trigger outbox against a real Airflow that refuses triggers: they back off on their own,
newer good ones are posted at once, and one refused for longer than the give-up time is given
up with an error, not retried forever.

A study index of the test's own (the listener's API, no files needed) holds 120 triggers of a
flow Airflow does not know (a deleted or renamed flow file: HTTP 404), then one of the
session's real flow; the delivery posts them to the session stack's API server.
"""

from __future__ import annotations

import logging
import time
import urllib.parse

import pytest

from listener.outbox import OutboxDelivery
from peers import wait_for
from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable
from raddeploy_provider.store import NEVER, StoredInstance, StudyIndex

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

GOOD_DAG = "e2e_ct_threshold"  # the session stack's flow (tests/e2e/conftest.py)
REFUSED = 120  # more than one round of the outbox (100 a round)


def instance(n: int, study: str) -> StoredInstance:
    return StoredInstance(sop_uid=f"1.2.826.0.1.3680043.10.77.{n}", study_uid=study, series_uid=f"{study}.1",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                          path=f"studies/{study}/x.dcm", size=1, sha256="", received_at=time.time(),
                          tags={"Modality": "CT"})


def deliver(outbox: OutboxDelivery, tries: int = 5) -> int:
    """One round of the outbox; standalone Airflow's SQLite may answer 500 to a burst: that round again."""
    for _ in range(tries - 1):
        try:
            return outbox.deliver_pending()
        except AirflowUnavailable:
            time.sleep(0.5)
    return outbox.deliver_pending()


def test_refused_triggers_never_block_newer_ones_and_are_given_up(stack, airflow: AirflowClient, tmp_path, caplog):
    index = StudyIndex(tmp_path / "index.sqlite3")
    for n in range(REFUSED):
        index.add(instance(n, f"1.2.826.0.1.3680043.10.78.{n}"), {"e2e_deleted_flow": NEVER})
    good_study = f"1.2.826.0.1.3680043.10.79.{int(time.time())}"
    index.add(instance(10_000, good_study), {GOOD_DAG: NEVER})
    good_run = f"{good_study}.1"
    outbox = OutboxDelivery(index, AirflowClient(stack.api_url, "admin", stack.passwords()["admin"]),
                            give_up_after=3.0)
    caplog.set_level(logging.INFO, logger="raddeploy.listener.outbox")
    try:
        # Round 1: the 100 oldest, all refused. Round 2 posts the good one first: the refused
        # wait behind it (their back-off starts at 1 s, so some may be due again already).
        assert deliver(outbox) == 100
        deliver(outbox)
        status, run = airflow.get(f"/api/v2/dags/{GOOD_DAG}/dagRuns/{urllib.parse.quote(good_run, safe='')}")
        assert status == 200 and run["conf"] == {"study_uid": good_study, "generation": 1}
        # Each refused one waits its back-off; on a loaded machine the two rounds may already
        # outlast the give-up time of the earliest (then given up, not waiting).
        waiting = index.pending_triggers(limit=1000, now=time.time() + 10)
        assert len(waiting) + len(index.given_up_triggers()) == REFUSED
        assert waiting and {w.last_error[:8] for w in waiting} == {"HTTP 404"}
        assert all(w.attempts >= 1 and w.first_refused_at for w in waiting)

        # Refused again after the give-up time since their first refusal: given up, logged once each.
        def all_given_up():
            deliver(outbox)
            return len(index.given_up_triggers()) == REFUSED or None
        wait_for(all_given_up, 30, "every refused trigger to be given up", interval=0.5)
        assert index.next_trigger_due() is None
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == REFUSED
        assert errors[0].startswith("trigger of e2e_deleted_flow run 1.2.826.0.1.3680043.10.78.")
        assert "given up: Airflow refused it for 3s (HTTP 404" in errors[0]
    finally:
        airflow._request("DELETE", f"/api/v2/dags/{GOOD_DAG}/dagRuns/{urllib.parse.quote(good_run, safe='')}", None)
        index.close()
