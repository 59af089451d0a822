"""What a notification says: an event of one run, as webhook JSON and as a short mail.

Pure values, no Airflow: :mod:`raddeploy_provider.notifications` sends them through Airflow's
notifiers. A notice is built only from the flow's name, the DAG and run ids (UIDs), task ids,
durations and :func:`error_line` of an exception, never from DICOM headers, ``conf`` beyond
the ids, log tails or text a person typed: it leaves the hospital's systems (a chat webhook, an
e-mail), so it must hold no patient name or ID.
"""

from __future__ import annotations

import html
import os
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from raddeploy_provider.units import format_duration

if TYPE_CHECKING:
    from raddeploy_provider.flows.model import NotifySpec

#: The events a flow or the deployment may ask to hear of (flows/schema.py NOTIFY "on" choices).
FAILURE, REJECTION, DEADLINE, DELIVERY = "failure", "rejection", "deadline", "delivery"
EVENTS = (FAILURE, REJECTION, DEADLINE, DELIVERY)
#: RADDEPLOY_NOTIFY_ON's default: what goes wrong, not every success.
DEFAULT_EVENTS = (FAILURE, REJECTION, DEADLINE)
#: The deployment's own alert, not a flow's: the data dir below its low-water mark of free disk
#: (the retention job). It goes to the deployment's webhook and mail whenever they are set.
DISK = "disk"

#: The packages whose exceptions' first lines we wrote ourselves (see :func:`error_line`).
_OUR_CODE = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep
                  for name in ("raddeploy_provider", "listener", "raddeploy"))
#: The modules whose exception classes carry our words when our code raises them.
_OUR_TYPES = ("raddeploy_provider.", "listener.", "raddeploy.", "airflow.")
MAX_REASON = 300


@dataclass(frozen=True)
class Targets:
    """Where one flow's notices go, the flow's ``notify`` over the deployment's settings."""

    on: tuple[str, ...]
    webhook: str | None  # an Airflow HTTP connection id
    email: tuple[str, ...]
    smtp: str  # the Airflow SMTP connection id mails go through

    def wants(self, event: str) -> bool:
        """Is ``event`` to be sent, and is there anyone to send it to?"""
        return event in self.on and bool(self.webhook or self.email)


def targets(spec: NotifySpec, *, on: tuple[str, ...], webhook: str | None, email: tuple[str, ...],
            smtp: str) -> Targets:
    """The flow's ``notify`` field by field over the deployment's (``RADDEPLOY_NOTIFY_*``); an
    empty ``webhook`` or ``email`` in the flow means none, ``None`` the deployment's."""
    hook = spec.webhook if spec.webhook is not None else webhook
    return Targets(on=tuple(spec.on if spec.on is not None else on), webhook=hook or None,
                   email=tuple(spec.email if spec.email is not None else email), smtp=smtp)


@dataclass(frozen=True)
class Notice:
    """One event of one run. ``state``: the run's (or, for ``failure``, the task's) state as
    Airflow names it, ``rejected`` for a rejection; ``reason``: one line in words."""

    event: str
    flow: str
    dag_id: str
    run_id: str
    state: str
    reason: str
    url: str

    def payload(self) -> dict[str, str]:
        """The webhook's JSON body."""
        return asdict(self)

    @property
    def subject(self) -> str:
        return f"[raddeploy] {self.event}: {self.flow} {self.run_id}"

    def text(self) -> str:
        """The mail's body, plain text."""
        return (f"{HEADLINES[self.event]}\n\n"
                f"Flow:   {self.flow} (DAG {self.dag_id})\n"
                f"Run:    {self.run_id}\n"
                f"State:  {self.state}\n"
                f"Reason: {self.reason}\n\n"
                f"{self.url}\n")

    def html(self) -> str:
        """:meth:`text` as the HTML part Airflow's SMTP notifier sends (it sends text/html only)."""
        return f"<pre>{html.escape(self.text())}</pre>"


HEADLINES = {
    FAILURE: "A run of a raddeploy flow failed: nothing more is sent for it.",
    REJECTION: "A review rejected a run's results: nothing is sent for it.",
    DEADLINE: "A run of a raddeploy flow missed its deadline.",
    DELIVERY: "A run of a raddeploy flow delivered its results.",
    DISK: "The raddeploy data dir is low on free disk.",
}


def run_url(base: str, dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI."""
    quote = lambda text: urllib.parse.quote(text, safe="")  # noqa: E731
    return f"{base.rstrip('/')}/dags/{quote(dag_id)}/runs/{quote(run_id)}"


def notice(event: str, *, flow: str, dag_id: str, run_id: str, state: str, reason: str, ui_url: str) -> Notice:
    if event not in EVENTS and event != DISK:
        raise ValueError(f"unknown notification event {event!r}: one of {', '.join(EVENTS)}")
    reason = " ".join(reason.split())  # one line
    if len(reason) > MAX_REASON:
        reason = reason[:MAX_REASON - 3] + "..."
    return Notice(event, flow, dag_id, run_id, state, reason, run_url(ui_url, dag_id, run_id))


def failure_reason(task_id: str, error: BaseException | str | None) -> str:
    line = error_line(error)
    return f"task {task_id} failed" + (f": {line}" if line else "")


def rejection_reason(who: str | None, *, timed_out: bool = False) -> str:
    """What a rejection says: who, never why (a reviewer's words may name the patient; they
    are on the run's page, behind the UI's login)."""
    if timed_out:
        return "the review timed out, which rejects the results"
    return f"rejected by {who}" if who else "rejected"


def deadline_reason(deadline: float, state: str) -> str:
    limit = format_duration(deadline)
    if state == "success":
        return f"delivered later than {limit} after it was queued"
    return f"not delivered {limit} after it was queued; the run is {state}"


def delivery_reason(sends: int) -> str:
    return "results sent to the destination" if sends == 1 else f"results sent to all {sends} destinations"


def error_line(error: BaseException | str | None) -> str:
    """The first line of an exception's text if our own code raised it, else its class name.

    Ours: raised by a line of our packages, and of a class of ours or Airflow's (the ones we
    raise with our own words: ``AirflowFailException(f"model {task} ...")``, ``ModelFailed``).
    Our messages name tasks, images, exit codes, counts, UIDs and AE titles (README "Patient data
    and safety"); a third party's, or a builtin error of our code (``int(value)``), may quote
    whatever it read, and a model's log tail (which ModelFailed carries from its second line on)
    may hold anything: never more than line one.
    """
    if error is None:
        return ""
    if isinstance(error, str):  # an error Airflow gives as text (a task that died): not ours to quote
        return ""
    if not (_raised_by_us(error.__traceback__) and type(error).__module__.startswith(_OUR_TYPES)):
        return type(error).__name__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _raised_by_us(tb: TracebackType | None) -> bool:
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    return str(Path(last.tb_frame.f_code.co_filename).resolve()).startswith(_OUR_CODE)
