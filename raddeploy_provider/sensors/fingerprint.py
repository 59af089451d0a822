"""FingerprintSensor: wait until the study holds what the flow needs, then freeze the input."""

from __future__ import annotations

import time
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException

from raddeploy_provider.config import load_settings
from raddeploy_provider.flows import Flow, unmet_triggers
from raddeploy_provider.flows.matching import select_inputs
from raddeploy_provider.store import StudyStore, snapshot

from raddeploy_provider.operators.run_folder import run_dir


class FingerprintSensor(BaseSensorOperator):
    """Proceeds when every trigger of ``flow`` is satisfied and the study has been quiet.

    Then it closes the run in the index (later instances open the next generation) and
    hard-links the matched instances into the run's ``input/`` folder, laid out as the
    flow says. Returns a small summary (counts and UIDs, no patient data).

    :param flow: the flow this DAG runs.
    """

    ui_color = "#e8f4c7"

    def __init__(self, *, flow: Flow, **kwargs: Any) -> None:
        kwargs.setdefault("poke_interval", 1.0)
        kwargs.setdefault("timeout", flow.grouping.timeout)
        kwargs.setdefault("soft_fail", flow.grouping.on_timeout == "skip")
        super().__init__(**kwargs)
        self.flow = flow

    def poke(self, context: Any) -> PokeReturnValue | bool:
        conf = context["dag_run"].conf or {}
        study_uid = conf.get("study_uid")
        if not study_uid:
            raise AirflowException("this run has no study_uid in its conf: flows are started by the "
                                   "listener; to start one by hand, trigger with {\"study_uid\": \"...\"}")
        store = StudyStore(load_settings().data_dir)
        instances = store.index.instances(study_uid)
        unmet = unmet_triggers(self.flow, [inst.tags for inst in instances])
        if unmet:
            for i in unmet:
                self.log.info("waiting: trigger %d (%s) not received yet", i + 1, self.flow.triggers[i].describe())
            return False
        last = store.index.last_received(study_uid) or 0.0
        quiet_for = time.time() - last
        if quiet_for < self.flow.grouping.quiet_period:
            self.log.info("waiting: study received an instance %.1f s ago; needs %.0f s of quiet",
                          quiet_for, self.flow.grouping.quiet_period)
            return False
        instances = store.index.close_run(self.flow.dag_id, context["run_id"], study_uid)
        chosen = [instances[i] for i in select_inputs(self.flow, [(x.series_uid, x.tags) for x in instances])]
        made = snapshot(chosen, store.layout.root, run_dir(context) / "input", self.flow.input.layout)
        summary = {"study_uid": study_uid, "instances": len(made),
                   "series": sorted({x.series_uid for x in chosen})}
        self.log.info("input ready: %d instances of %d series", len(made), len(summary["series"]))
        return PokeReturnValue(is_done=True, xcom_value=summary)
