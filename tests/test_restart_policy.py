"""The supervisor's restart policy of `raddeploy run` (raddeploy/embedded.py), as values: no clock, no process.

The real processes are in tests/e2e/test_supervision.py.
"""

from __future__ import annotations

import signal

from raddeploy.embedded import GiveUp, Restart, RestartPolicy, airflow_components, exit_text


def test_delay_starts_at_one_second_and_doubles_to_the_cap() -> None:
    policy = RestartPolicy(max_deaths=100, window=600)
    delays = []
    for i in range(9):
        decision = policy.died(now=i * 5.0)  # died again soon after each restart: never healthy for long
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
        policy.up(now=i * 5.0 + 1)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_child_healthy_for_a_while_starts_at_one_second_again() -> None:
    policy = RestartPolicy(healthy_reset=120)
    assert policy.died(0) == Restart(delay=1, deaths=1)
    policy.up(2)
    assert policy.died(60) == Restart(delay=2, deaths=2)  # up 58 s: not long enough
    policy.up(63)
    assert policy.died(63 + 120) == Restart(delay=1, deaths=3)  # up 120 s: the back-off is forgiven


def test_gives_up_at_the_fifth_death_within_ten_minutes() -> None:
    policy = RestartPolicy()
    decisions = [policy.died(t) for t in (0, 10, 20, 30, 40)]
    assert [type(d) for d in decisions] == [Restart] * 4 + [GiveUp]
    assert decisions[-1] == GiveUp(deaths=5, window=600)


def test_deaths_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(max_deaths=3, window=600)
    assert isinstance(policy.died(0), Restart)
    assert isinstance(policy.died(300), Restart)
    assert policy.died(601) == Restart(delay=4, deaths=2)  # the one at 0 is out of the window
    assert policy.died(650) == GiveUp(deaths=3, window=600)


def test_a_restart_that_never_came_up_counts_and_keeps_the_back_off() -> None:
    policy = RestartPolicy()
    policy.up(0)
    assert policy.died(1000) == Restart(delay=1, deaths=1)  # healthy 1000 s before: fresh start
    assert policy.died(1200) == Restart(delay=2, deaths=2)  # never up in between (a failed start)


def test_death_texts() -> None:
    assert exit_text(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_text(1) == "exit code 1"
    assert exit_text(None) == "exit status unknown"
    # raw wait statuses, as a zombie's /proc/<pid>/stat holds them
    assert exit_text(9, wait_status=True) == "killed by SIGKILL"
    assert exit_text(3 << 8, wait_status=True) == "exit code 3"
    assert exit_text(0, wait_status=True) == "exit code 0"


def test_components_of_a_process_without_children() -> None:
    assert airflow_components(2**22 + 12345) == {}  # no such parent: nothing, no error
