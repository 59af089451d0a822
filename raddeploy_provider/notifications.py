"""Tell people of a run's failure, rejection, missed deadline or delivery, through Airflow's notifiers.

What a notice says is :mod:`raddeploy_provider.notices` (pure, no patient data); this module
decides when one is sent and sends it: to an Airflow HTTP connection as JSON (the HTTP
provider's ``HttpNotifier``) and as mail through an SMTP connection (the SMTP provider's
``SmtpNotifier``), to the flow's ``notify`` targets over the deployment's ``RADDEPLOY_NOTIFY_*``.
A notification that cannot be sent is logged; it never fails a task or a run.

- **failure**: the task-level ``on_failure_callback`` of every task (it has the exception;
  the DAG-level one runs in the DAG processor without it), once per run and clearing: the first
  failed task makes ``<run>/notified/failure.<clear number>`` and only it sends.
- **delivery**: the ``on_success_callback`` of the send tasks: the one that finds every send
  task of its run succeeded makes ``notified/delivery.<clear number>`` and sends. A task's success
  is recorded before its callback runs, so the last of them always sees all done.
- **deadline**: Airflow 3.3's own deadline alerts (``DeadlineAlert`` from the run's
  ``queued_at``): the scheduler marks a deadline missed once, row-locked, and queues
  :func:`deadline_missed` on the triggerer; a run that succeeds in time has its deadline
  pruned. A run that already failed is not alerted (its failure was the news).
- **rejection**: :func:`notify_rejection`, called by the review's approval task.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from raddeploy_provider import notices
from raddeploy_provider.config import Settings, load_settings
from raddeploy_provider.flows.graph import return_task_id, send_task_id
from raddeploy_provider.notices import DEADLINE, DELIVERY, FAILURE, REJECTION, Notice, Targets
from raddeploy_provider.store.errors import StoreError
from raddeploy_provider.units import format_duration

if TYPE_CHECKING:
    from raddeploy_provider.flows.model import Flow

log = logging.getLogger(__name__)

#: Seconds a webhook may take to answer (the HTTP hook waits forever by default).
WEBHOOK_TIMEOUT = 10.0


def targets_of(flow: Flow, settings: Settings | None = None) -> Targets:
    """Where ``flow``'s notices go: its ``notify``, field by field over the deployment's."""
    settings = settings or load_settings()
    return notices.targets(flow.notify, on=settings.notify_on, webhook=settings.notify_webhook,
                           email=settings.notify_email, smtp=settings.notify_smtp)


def send_task_ids(flow: Flow) -> tuple[str, ...]:
    """The flow's send tasks (destinations, then return-to-sender), as dag_factory names them."""
    return (tuple(send_task_id(i, dest) for i, dest in enumerate(flow.destinations))
            + tuple(return_task_id(port) for port in flow.return_to_sender))


def dag_arguments(flow: Flow, default_args: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """The DAG(...) arguments of ``flow``'s notifications: ``default_args`` with the task
    callbacks the flow's events need, and its ``deadline`` alert (None without one)."""
    settings = settings or load_settings()
    targets = targets_of(flow, settings)
    events = FlowEvents(flow.name, flow.dag_id, targets, settings.ui_url, send_task_ids(flow))
    args = dict(default_args)
    if targets.wants(FAILURE):
        args["on_failure_callback"] = [events.task_failed]
    if targets.wants(DELIVERY) and events.sends:
        args["on_success_callback"] = [events.task_succeeded]
    deadline = None
    if flow.deadline and targets.wants(DEADLINE):
        from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

        deadline = DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(seconds=flow.deadline),
            # Stored in Airflow's database and hashed by it: flat, plain values only.
            callback=AsyncCallback(deadline_missed, kwargs={
                "flow": flow.name, "deadline": float(flow.deadline), "webhook": targets.webhook or "",
                "email": ",".join(targets.email), "smtp": targets.smtp, "ui_url": settings.ui_url}),
            name=f"delivered within {format_duration(flow.deadline)}",
        )
    return {"default_args": args, "deadline": deadline}


@dataclass(frozen=True)
class FlowEvents:
    """One flow's notices: its task callbacks (picklable and deep-copyable, as default_args are)."""

    flow: str
    dag_id: str
    targets: Targets
    ui_url: str
    sends: tuple[str, ...] = ()

    def notice(self, event: str, run_id: str, state: str, reason: str) -> Notice:
        return notices.notice(event, flow=self.flow, dag_id=self.dag_id, run_id=run_id, state=state,
                              reason=reason, ui_url=self.ui_url)

    def task_failed(self, context: Any) -> None:
        """``on_failure_callback``: the run's first failed task (per clearing) tells of it."""
        try:
            ti = context.get("ti") or context.get("task_instance")
            run_id = _run_id(context)
            if run_id is None or ti is None or not self.targets.wants(FAILURE):
                return
            if not once(self.dag_id, run_id, f"{FAILURE}.{_clear_number(context)}"):
                log.info("failure of %s in run %s: already notified for this run", ti.task_id, run_id)
                return
            reason = notices.failure_reason(ti.task_id, context.get("exception"))
            send(self.notice(FAILURE, run_id, "failed", reason), self.targets, context)
        except Exception:  # never the task's problem
            log.exception("failure notification not sent")

    def task_succeeded(self, context: Any) -> None:
        """``on_success_callback``: the send task that finds all of its run's sends done tells of delivery."""
        try:
            ti = context.get("ti") or context.get("task_instance")
            run_id = _run_id(context)
            if run_id is None or ti is None or ti.task_id not in self.sends or not self.targets.wants(DELIVERY):
                return
            if len(self.sends) > 1:
                states = ti.get_task_states(dag_id=self.dag_id, task_ids=list(self.sends), run_ids=[run_id])
                pending = [task for task in self.sends if (states.get(run_id) or {}).get(task) != "success"]
                if pending:
                    log.info("delivery of run %s: %s not done yet", run_id, ", ".join(pending))
                    return
            if not once(self.dag_id, run_id, f"{DELIVERY}.{_clear_number(context)}"):
                return
            send(self.notice(DELIVERY, run_id, "success", notices.delivery_reason(len(self.sends))),
                 self.targets, context)
        except Exception:
            log.exception("delivery notification not sent")


def notify_rejection(context: Any, flow: Flow, who: str | None = None, *, timed_out: bool = False) -> bool:
    """Tell of a review that rejected the run's results (``who``: the Airflow user who did;
    ``timed_out``: the review timed out to a rejection). Call it from the approval task, with its
    context. The reviewer's words are never sent (they may name the patient): the notice says
    who, and links to the run. Returns whether anything was sent; never raises."""
    try:
        targets = targets_of(flow)
        run_id = _run_id(context)
        if run_id is None or not targets.wants(REJECTION):
            return False
        if not once(flow.dag_id, run_id, f"{REJECTION}.{_clear_number(context)}"):
            return False
        reason = notices.rejection_reason(who, timed_out=timed_out)
        events = FlowEvents(flow.name, flow.dag_id, targets, load_settings().ui_url)
        return send(events.notice(REJECTION, run_id, "rejected", reason), targets, context) > 0
    except Exception:
        log.exception("rejection notification not sent")
        return False


async def deadline_missed(context: dict[str, Any] | None = None, *, flow: str, deadline: float, webhook: str,
                          email: str, smtp: str, ui_url: str) -> str:
    """The deadline alert's callback, run on the triggerer once Airflow found the run's deadline
    missed; ``context`` is Airflow's: ``{"dag_run": <the run as the REST API shows it>, "deadline"}``.
    Returns what it did (Airflow keeps it as the callback's output)."""
    run = (context or {}).get("dag_run") or {}
    dag_id, run_id, state = run.get("dag_id"), run.get("dag_run_id") or run.get("run_id"), run.get("state", "")
    if not dag_id or not run_id:
        log.warning("deadline missed, but Airflow named no run: nothing sent")
        return "no run named"
    if state == "failed":
        log.info("deadline of run %s passed after the run failed: its failure was the notice", run_id)
        return "not sent: the run had failed"
    if not once(dag_id, run_id, DEADLINE):
        return "not sent: already notified"
    targets = Targets(on=(DEADLINE,), webhook=webhook or None,
                      email=tuple(a for a in email.split(",") if a), smtp=smtp)
    events = FlowEvents(flow, dag_id, targets, ui_url)
    notice = events.notice(DEADLINE, run_id, state or "unknown", notices.deadline_reason(deadline, state))
    sent = await asend(notice, targets, context or {})
    return f"sent to {sent} of {bool(targets.webhook) + bool(targets.email)} targets"


def once(dag_id: str, run_id: str, name: str) -> bool:
    """True the first time ``name`` is claimed for the run (``<run>/notified/<name>``, made with
    O_EXCL on the data dir every worker shares); a marker that cannot be made says yes: better
    a notice twice than never."""
    try:
        run = load_settings().data.run(dag_id, run_id)
        run.notified.mkdir(parents=True, exist_ok=True)
        os.close(os.open(run.notified / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
    except FileExistsError:
        return False
    except (OSError, StoreError) as exc:
        log.warning("notice %s of run %s not recorded (%s): sending it anyway", name, run_id, exc)
    return True


def send(notice: Notice, targets: Targets, context: Any) -> int:
    """Send ``notice`` to the webhook and the mail addresses (in a task or the DAG processor);
    how many of the two went out. Failures are logged."""
    from airflow.providers.http.notifications import HttpNotifier
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    sent = 0
    # notify() itself, not the notifier's __call__: that would render the flow's text as a Jinja template.
    if targets.webhook:
        try:
            HttpNotifier(http_conn_id=targets.webhook, json=notice.payload(),
                         extra_options={"timeout": WEBHOOK_TIMEOUT}).notify(context)
            sent += 1
            log.info("%s of run %s sent to webhook %s", notice.event, notice.run_id, targets.webhook)
        except Exception as exc:
            log.warning("%s of run %s not sent to webhook %s: %s", notice.event, notice.run_id, targets.webhook, exc)
    if targets.email:
        try:
            _mail(SmtpNotifier, notice, targets).notify(context)
            sent += 1
            log.info("%s of run %s mailed to %d address(es)", notice.event, notice.run_id, len(targets.email))
        except Exception as exc:
            log.warning("%s of run %s not mailed (connection %s): %s", notice.event, notice.run_id, targets.smtp, exc)
    return sent


async def asend(notice: Notice, targets: Targets, context: Any) -> int:
    """:func:`send` on the triggerer's event loop (the notifiers' async side)."""
    import aiohttp
    from airflow.providers.http.notifications import HttpNotifier
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    sent = 0
    if targets.webhook:
        try:
            await HttpNotifier(http_conn_id=targets.webhook, json=notice.payload(),
                               extra_options={"timeout": aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)}
                               ).async_notify(context)
            sent += 1
            log.info("%s of run %s sent to webhook %s", notice.event, notice.run_id, targets.webhook)
        except Exception as exc:
            log.warning("%s of run %s not sent to webhook %s: %s", notice.event, notice.run_id, targets.webhook, exc)
    if targets.email:
        try:
            await _mail(SmtpNotifier, notice, targets).async_notify(context)
            sent += 1
            log.info("%s of run %s mailed to %d address(es)", notice.event, notice.run_id, len(targets.email))
        except Exception as exc:
            log.warning("%s of run %s not mailed (connection %s): %s", notice.event, notice.run_id, targets.smtp, exc)
    return sent


def _mail(notifier: type, notice: Notice, targets: Targets) -> Any:
    # from_email None: the SMTP connection's "From email" (its extra `from_email`).
    return notifier(to=list(targets.email), from_email=None, subject=notice.subject, html_content=notice.html(),
                    smtp_conn_id=targets.smtp)


def _run_id(context: Any) -> str | None:
    run_id = context.get("run_id")
    if run_id:
        return str(run_id)
    dag_run = context.get("dag_run")
    found = getattr(dag_run, "run_id", None)
    return str(found) if found else None


def _clear_number(context: Any) -> int:
    return int(getattr(context.get("dag_run"), "clear_number", 0) or 0)


def notify_disk_low(context: Any, alert: str) -> int:
    """The retention task's alert that the data dir is below its low-water mark, to the deployment's
    webhook and mail (``RADDEPLOY_NOTIFY_WEBHOOK`` / ``_EMAIL``) whenever they are set; how many went
    out. One per retention run while the disk stays low (hourly by default). Never raises."""
    try:
        settings = load_settings()
        targets = Targets(on=(notices.DISK,), webhook=settings.notify_webhook, email=settings.notify_email,
                          smtp=settings.notify_smtp)
        run_id = _run_id(context) or ""
        dag_id = getattr(context.get("dag"), "dag_id", "") or "raddeploy_retention"
        notice = notices.notice(notices.DISK, flow="raddeploy data dir", dag_id=dag_id, run_id=run_id,
                                state="low disk", reason=alert, ui_url=settings.ui_url)
        return send(notice, targets, context) if (targets.webhook or targets.email) else 0
    except Exception:
        log.exception("low-disk notification not sent")
        return 0
