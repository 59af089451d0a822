"""Delivers the outbox's trigger records to Airflow, in the background, until they stick.

The index commits a trigger record with the instance that caused it; this loop only posts
what is there. So a trigger survives a crash of the listener and an outage of Airflow:
on start, and whenever Airflow comes back, everything pending is posted again, and the
deterministic run id makes a repeated post harmless (409).
"""

from __future__ import annotations

import logging
import threading
import time

from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable, TriggerRejected
from raddeploy_provider.store import StudyIndex
from raddeploy_provider.units import format_duration

log = logging.getLogger("raddeploy.listener.outbox")


#: A refused trigger waits 1 s, 2 s, 4 s, ... up to this long between tries.
MAX_REFUSED_BACKOFF = 300.0
#: Seconds the loop waits after Airflow first fails it; doubled for each pass that fails again.
FIRST_BACKOFF = 0.5


def next_wait(backoff: float, progressed: bool, max_backoff: float) -> tuple[float, float]:
    """How long to wait after a pass Airflow failed (``AirflowUnavailable``), and the back-off
    for the next failure. A pass that delivered some triggers before it failed met an Airflow
    that is up and answered one request with an error (on SQLite, a 500 when its API server's
    lock wait runs out in a burst): the back-off starts again, so that a burst is not delivered
    seconds late. A pass that delivered nothing waits longer each time, up to ``max_backoff``."""
    wait = FIRST_BACKOFF if progressed else backoff
    return wait, min(wait * 2, max_backoff)


class OutboxDelivery:
    """A thread that posts pending triggers; :meth:`wake` after committing new ones.

    Airflow unreachable: everything waits, with one back-off for the whole loop. A trigger
    Airflow refuses (its DAG deleted, renamed, not parsed yet) waits on its own back-off, so
    the others keep flowing; refused for longer than ``give_up_after`` seconds, it is given
    up, logged as an error and kept in the outbox for ``raddeploy status``.
    """

    def __init__(self, index: StudyIndex, client: AirflowClient, max_backoff: float = 5.0,
                 give_up_after: float = 6 * 3600.0) -> None:
        self.index = index
        self.client = client
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        #: Triggers Airflow took since the start (a pass that took some before failing made progress).
        self.delivered = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._stop.is_set():
            self._wake.clear()
            delivered = self.delivered
            try:
                self.deliver_pending()
                due = self.index.next_trigger_due()  # in the try: an index briefly unreachable must not end it
            except AirflowUnavailable as exc:
                wait, backoff = next_wait(backoff, self.delivered > delivered, self.max_backoff)
                log.warning("Airflow unreachable (%s); triggers stay in the outbox, retry in %.1f s", exc, wait)
                self._stop.wait(wait)
                continue
            except Exception:  # never let the delivery thread die: the listener would go deaf
                log.exception("outbox delivery failed; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = FIRST_BACKOFF
            wait = 5.0 if due is None else min(5.0, max(0.0, due - time.time()))
            self._wake.wait(timeout=wait)

    def deliver_pending(self) -> int:
        """Post every trigger that is due once; return how many Airflow refused."""
        refused = 0
        for item in self.index.pending_triggers():
            try:
                outcome = self.client.trigger(item.dag_id, item.run_id, item.conf)
            except AirflowUnavailable as exc:
                self.index.mark_failed_attempt(item.id, f"Airflow unreachable: {exc}")
                raise
            except TriggerRejected as exc:
                refused += 1
                delay = min(2.0 ** item.attempts, MAX_REFUSED_BACKOFF)
                if self.index.mark_refused(item.id, str(exc), time.time() + delay, self.give_up_after):
                    log.error("trigger of %s run %s given up: Airflow refused it for %s (%s); the instances "
                              "are stored; trigger the run by hand once the flow exists", item.dag_id,
                              item.run_id, format_duration(self.give_up_after), exc)
                elif item.attempts in (0, 5) or item.attempts % 50 == 0:
                    log.warning("trigger of %s run %s refused (%s); next try in %.0f s", item.dag_id,
                                item.run_id, exc, delay)
                continue
            self.index.mark_delivered(item.id)
            self.delivered += 1
            log.info("run %s of %s %s", item.run_id, item.dag_id,
                     "triggered" if outcome.created else "already existed")
        return refused
