"""StudyReadyTrigger: waits on the triggerer until a study is complete for a flow.

No worker slot is held while a study trickles in. The check itself (:mod:`raddeploy_provider
.completion`) reads the index, so it runs in a thread; the trigger says what it waits for in
the log when that changes, and keeps the run note current.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent

from raddeploy_provider.completion import readiness
from raddeploy_provider.config import load_settings
from raddeploy_provider.flows import FlowError, load_flow
from raddeploy_provider.utils.run_note import set_run_note
from raddeploy_provider.store import DataDir, StudyIndex

#: Log a still-waiting line at least this often, even when nothing changed.
REMIND_EVERY = 60.0

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
    """Fires ``{"status": "ready"}``, or ``{"status": "timeout", "waiting_for": ...}`` at ``deadline``.

    :param flow_file: the flow file (read again here: a trigger may outlive a DAG parse).
    :param dag_id: the flow's DAG id.
    :param run_id: the run waiting.
    :param study_uid: the study it waits for.
    :param data_dir: the data dir (its SQLite index, unless ``RADDEPLOY_INDEX_URL`` names one).
    :param deadline: epoch seconds when ``grouping.timeout`` is reached.
    :param poll_interval: seconds between checks.
    """

    def __init__(self, flow_file: str, dag_id: str, run_id: str, study_uid: str, data_dir: str,
                 deadline: float, poll_interval: float = 1.0) -> None:
        super().__init__()
        self.flow_file = flow_file
        self.dag_id = dag_id
        self.run_id = run_id
        self.study_uid = study_uid
        self.data_dir = data_dir
        self.deadline = deadline
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("raddeploy_provider.triggers.study_ready.StudyReadyTrigger", {
            "flow_file": self.flow_file, "dag_id": self.dag_id, "run_id": self.run_id,
            "study_uid": self.study_uid, "data_dir": self.data_dir, "deadline": self.deadline,
            "poll_interval": self.poll_interval,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            flow = await asyncio.to_thread(load_flow, Path(self.flow_file))
        except (FlowError, OSError) as exc:
            yield TriggerEvent({"status": "error", "message": f"the flow file no longer loads: {exc}"})
            return
        index = await asyncio.to_thread(triggerer_index, self.data_dir)
        said, said_at = None, 0.0
        while True:
            state = await asyncio.to_thread(readiness, flow, index, self.study_uid)
            if state.ready:
                yield TriggerEvent({"status": "ready"})
                return
            if time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "waiting_for": state.waiting_for,
                                    "unmet": list(state.unmet)})
                return
            # The quiet countdown changes every poll; say something when the rest changes.
            gist = (state.unmet, state.sending, state.instances == 0)
            if gist != said or time.monotonic() - said_at > REMIND_EVERY:
                self.log.info("waiting for study %s: %s", self.study_uid, state.waiting_for)
                await asyncio.to_thread(set_run_note, self.dag_id, self.run_id,
                                        f"Waiting: {state.waiting_for}")
                said, said_at = gist, time.monotonic()
            await asyncio.sleep(self.poll_interval)
