"""Is a study complete enough for a flow to run? The fingerprint sensor's question, answered
without Airflow so the sensor, its trigger and the tests share one reading.

Ready means: every trigger of the flow is satisfied by some instance, no association is
still sending the study, and nothing arrived for ``grouping.quiet_period``. The answer says
in words what is missing, for the task log and the run note.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from raddeploy_provider.flows import Flow, unmet_triggers
from raddeploy_provider.store import StudyIndex

#: An association that sent nothing for this long is not counted as still sending (a
#: listener that died never said it ended).
SENDING_STALE_AFTER = 120.0


@dataclass(frozen=True)
class Readiness:
    ready: bool
    unmet: tuple[int, ...]  # trigger indexes no instance satisfies
    instances: int
    quiet_for: float | None  # seconds since the last instance, None if none yet
    sending: int  # associations still sending the study
    waiting_for: str  # what is missing, in words ("" when ready)
    quiet_left: float = 0.0  # seconds of quiet period still to wait

    @property
    def only_quiet_left(self) -> bool:
        """Everything is there and nobody is sending: only the quiet period is left."""
        return not self.unmet and not self.sending and self.instances > 0


def readiness(flow: Flow, index: StudyIndex, study_uid: str, now: float | None = None) -> Readiness:
    now = time.time() if now is None else now
    instances = index.instances(study_uid)
    unmet = tuple(unmet_triggers(flow, [inst.tags for inst in instances]))
    last = max((inst.received_at for inst in instances), default=None)
    quiet_for = None if last is None else max(0.0, now - last)
    sending = index.sending(study_uid, now - SENDING_STALE_AFTER)
    reasons = [f"trigger {i + 1}: {flow.triggers[i].describe()} - not received yet" for i in unmet]
    if sending:
        reasons.append(f"{sending} association{'s' if sending > 1 else ''} still sending the study")
    if quiet_for is not None and quiet_for < flow.grouping.quiet_period:
        reasons.append(f"quiet for {quiet_for:.1f} s of {flow.grouping.quiet_period:g} s")
    quiet_left = 0.0 if quiet_for is None else max(0.0, flow.grouping.quiet_period - quiet_for)
    return Readiness(ready=not reasons and bool(instances), unmet=unmet, instances=len(instances),
                     quiet_for=quiet_for, sending=sending, waiting_for="; ".join(reasons) or
                     ("no instance of the study yet" if not instances else ""), quiet_left=quiet_left)
