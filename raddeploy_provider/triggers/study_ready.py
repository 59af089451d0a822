"""StudyReadyTrigger: waits on the triggerer until a study is complete for a flow.

No worker slot is held while a study trickles in. The check itself (:mod:`raddeploy_provider
.completion`) reads the index, so it runs in a thread; the trigger says what it waits for in
the log when that changes, and keeps the run note current.

The fingerprint sensor starts here (Airflow's ``start_from_trigger``): the trigger then also
takes the input (:func:`raddeploy_provider.utils.intake.take_input`) and ends the task itself
(``TaskSuccessEvent``), so the common run costs no worker start for its sensor and holds no
executor slot while it waits. What it leaves to a worker (the sensor's ``execute_complete``):
decompressed input, a timeout, and an input it could not take (the worker tries again, with the
task's retries and its error messages).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from raddeploy_provider.completion import readiness
from raddeploy_provider.config import load_settings
from raddeploy_provider.flows import FlowError, load_flow
from raddeploy_provider.utils.intake import take_input
from raddeploy_provider.utils.run_note import set_run_note
from raddeploy_provider.store import DataDir, StudyIndex

#: Log a still-waiting line at least this often, even when nothing changed.
REMIND_EVERY = 60.0

#: Seconds between a trigger's deadline (``grouping.timeout``) and Airflow's own timeout of the
#: deferred sensor: the trigger answers first, with what it waited for.
BACKSTOP = 300.0

#: Seconds of quiet period left that are waited out without a word (no log line, no run note:
#: the common case, every run has a quiet period).
SHORT_WAIT = 5.0

_indexes: dict[str, StudyIndex] = {}
_indexes_lock = threading.Lock()


def triggerer_index(data_dir: str) -> StudyIndex:
    """The index, one per triggerer process (its triggers share it: a PostgreSQL pool per
    trigger would take hundreds of connections). ``RADDEPLOY_INDEX_URL`` is read here, in the
    triggerer's own settings: never a trigger kwarg, which Airflow stores in its database, and
    the URL holds a password. Without it, the SQLite file in ``data_dir``."""
    target = load_settings().index_url or str(DataDir(Path(data_dir)).index)
    with _indexes_lock:
        if target not in _indexes:
            _indexes[target] = StudyIndex(target)
        return _indexes[target]


class StudyReadyTrigger(BaseTrigger):
    """Fires ``{"status": "ready"}``, or ``{"status": "timeout", "waiting_for": ...}`` at ``deadline``;
    with ``take_input``, takes the input when ready and ends the task (``TaskSuccessEvent``, the
    summary as its XCom) instead of firing ``ready``.

    :param flow_file: the flow file (read again here: a trigger may outlive a DAG parse).
    :param dag_id: the flow's DAG id.
    :param run_id: the run waiting.
    :param study_uid: the study it waits for.
    :param data_dir: the data dir (its SQLite index, unless ``RADDEPLOY_INDEX_URL`` names one);
        empty: the triggerer's own ``RADDEPLOY_DATA``.
    :param deadline: epoch seconds when ``grouping.timeout`` is reached; 0 (the start on the
        triggerer): ``BACKSTOP`` before Airflow's timeout of the deferral, which the scheduler set
        from the task's start, so it holds across triggerer restarts.
    :param poll_interval: seconds between checks.
    :param take_input: take the input here when ready (the sensor started on the triggerer).
    """

    def __init__(self, flow_file: str, dag_id: str, run_id: str, study_uid: str, data_dir: str,
                 deadline: float, poll_interval: float = 1.0, take_input: bool = False) -> None:
        super().__init__()
        self.flow_file = flow_file
        self.dag_id = dag_id
        self.run_id = run_id
        self.study_uid = study_uid
        self.data_dir = data_dir
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.take_input = take_input

    #: Where the triggerer finds it (serialize, and the sensor's start on the triggerer).
    CLASSPATH = "raddeploy_provider.triggers.study_ready.StudyReadyTrigger"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (self.CLASSPATH, {
            "flow_file": self.flow_file, "dag_id": self.dag_id, "run_id": self.run_id,
            "study_uid": self.study_uid, "data_dir": self.data_dir, "deadline": self.deadline,
            "poll_interval": self.poll_interval, "take_input": self.take_input,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if not self.study_uid:  # a run started by hand without one: the worker says what to do
            yield TriggerEvent({"status": "error", "message": "this run has no study_uid in its conf"})
            return
        try:
            flow = await asyncio.to_thread(load_flow, Path(self.flow_file))
        except (FlowError, OSError) as exc:
            yield TriggerEvent({"status": "error", "message": f"the flow file no longer loads: {exc}"})
            return
        data_dir = self.data_dir or str(load_settings().data_dir)
        index = await asyncio.to_thread(triggerer_index, data_dir)
        deadline = self.deadline
        if not deadline:
            after = getattr(self, "timeout_after", None)
            deadline = after.timestamp() - BACKSTOP if after else time.time() + flow.grouping.timeout
        said, said_at = None, 0.0
        while True:
            state = await asyncio.to_thread(readiness, flow, index, self.study_uid)
            if state.ready:
                if self.take_input:
                    try:
                        summary = await asyncio.to_thread(take_input, flow, index, Path(data_dir), self.run_id,
                                                          self.study_uid, noted=said is not None, log=self.log)
                    except Exception as exc:  # the worker takes it again, with the task's retries and errors
                        self.log.warning("input not taken on the triggerer (%s): a worker takes it", exc)
                    else:
                        yield TaskSuccessEvent(xcoms={"return_value": summary})
                        return
                yield TriggerEvent({"status": "ready"})
                return
            if time.time() >= deadline:
                yield TriggerEvent({"status": "timeout", "waiting_for": state.waiting_for,
                                    "unmet": list(state.unmet)})
                return
            if state.only_quiet_left and state.quiet_left <= SHORT_WAIT:
                await asyncio.sleep(state.quiet_left + 0.05)  # to the moment it ends, not to the next poll
                continue
            # The quiet countdown changes every poll; say something when the rest changes.
            gist = (state.unmet, state.sending, state.instances == 0)
            if gist != said or time.monotonic() - said_at > REMIND_EVERY:
                self.log.info("waiting for study %s: %s", self.study_uid, state.waiting_for)
                await asyncio.to_thread(set_run_note, self.dag_id, self.run_id, f"Waiting: {state.waiting_for}")
                said, said_at = gist, time.monotonic()
            await asyncio.sleep(self.poll_interval)
