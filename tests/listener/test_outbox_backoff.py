"""The outbox's wait after Airflow fails a pass (listener.outbox.next_wait).

A burst on the embedded stack's SQLite makes the API server answer the odd trigger with a 500
(its lock wait runs out) while it takes the others: measured, 100 runs of a burst, the doubling
wait of an outage reached 5 s and runs were triggered 40 s after their study arrived. The fault
cannot be caused on demand, so the rule is tested as the value it is."""

from __future__ import annotations

from listener.outbox import FIRST_BACKOFF, next_wait


def test_an_outage_waits_longer_each_failed_pass_up_to_the_maximum() -> None:
    backoff, waits = FIRST_BACKOFF, []
    for _ in range(6):
        wait, backoff = next_wait(backoff, progressed=False, max_backoff=5.0)
        waits.append(wait)
    assert waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_pass_that_delivered_some_before_failing_starts_the_wait_again() -> None:
    wait, backoff = next_wait(5.0, progressed=True, max_backoff=5.0)
    assert (wait, backoff) == (FIRST_BACKOFF, 1.0)
    wait, backoff = next_wait(backoff, progressed=False, max_backoff=5.0)  # then nothing again: it grows
    assert (wait, backoff) == (1.0, 2.0)
