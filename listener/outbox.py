"""Delivers the outbox's trigger records to Airflow, in the background, until they stick.

The index commits a trigger record with the instance that caused it; this loop only posts
what is there. So a trigger survives a crash of the listener and an outage of Airflow:
on start, and whenever Airflow comes back, everything pending is posted again, and the
deterministic run id makes a repeated post harmless (409).
"""

from __future__ import annotations

import logging
import threading

from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable, TriggerRejected
from raddeploy_provider.store import StudyIndex

log = logging.getLogger("raddeploy.listener.outbox")


class OutboxDelivery:
    """A thread that posts pending triggers; :meth:`wake` after committing new ones."""

    def __init__(self, index: StudyIndex, client: AirflowClient, max_backoff: float = 5.0) -> None:
        self.index = index
        self.client = client
        self.max_backoff = max_backoff
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self._wake.clear()
            try:
                left = self.deliver_pending()
            except AirflowUnavailable as exc:
                log.warning("Airflow unreachable (%s); triggers stay in the outbox, retry in %.0f s",
                            exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            except Exception:  # never let the delivery thread die: the listener would go deaf
                log.exception("outbox delivery failed; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if left:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            else:
                backoff = 0.5
                self._wake.wait(timeout=5.0)

    def deliver_pending(self) -> int:
        """Post every pending trigger once; return how many are still pending."""
        left = 0
        for item in self.index.pending_triggers():
            try:
                outcome = self.client.trigger(item.dag_id, item.run_id, item.conf)
            except AirflowUnavailable as exc:
                self.index.mark_failed_attempt(item.id, f"Airflow unreachable: {exc}")
                raise
            except TriggerRejected as exc:
                self.index.mark_failed_attempt(item.id, str(exc))
                if item.attempts in (0, 5) or item.attempts % 50 == 0:
                    log.warning("trigger of %s run %s refused (%s); will retry", item.dag_id, item.run_id, exc)
                left += 1
                continue
            self.index.mark_delivered(item.id)
            log.info("run %s of %s %s", item.run_id, item.dag_id,
                     "triggered" if outcome.created else "already existed")
        return left
