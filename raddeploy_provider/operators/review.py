"""ReviewOperator: a person approves a run's results before any send task runs (``review: required``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Context, Param

from raddeploy_provider import review
from raddeploy_provider.flows.model import Flow
from raddeploy_provider.store import manifest
from raddeploy_provider.utils.run_note import set_run_note
from raddeploy_provider.utils.runs import run_dir

class ReviewOperator(ApprovalOperator):
    """Airflow's :class:`ApprovalOperator` between the flow's models and its send tasks.

    The body (Markdown, :func:`raddeploy_provider.review.review_body`) is made when the models
    are done: input series, results with their ROIs and volumes, preview pictures. Approve: the
    sends run. Reject: every send task is skipped, the run ends successful (a decision, not a
    breakdown) and the run note and manifest say who rejected and why. ``reviewers`` are the only
    users the API lets answer; ``review_timeout`` ends the wait with ``on_review_timeout``.
    """

    ui_color = "#f4e3c7"
    template_fields = ()  # the flow's text is data (see ModelOperator)

    def __init__(self, *, flow: Flow, sent: list[str], **kwargs: Any) -> None:
        spec = flow.review
        if spec is None:
            raise ValueError(f"flow {flow.dag_id} has no `review: required`")
        default = self.APPROVE if spec.on_timeout == "approve" else self.REJECT
        super().__init__(
            subject=f"Review {flow.name} {flow.version}".rstrip(),
            body="The results are being prepared.",
            defaults=default if spec.timeout else None,
            response_timeout=timedelta(seconds=spec.timeout) if spec.timeout else None,
            assigned_users=[{"id": name, "name": name} for name in spec.reviewers] or None,
            params={"reason": Param("", type="string", title="Reason",
                                    description="Why you reject (or a remark on approval): kept in the run's record")},
            **kwargs,
        )
        self.flow = flow
        self.sent = list(sent)

    def execute(self, context: Context) -> Any:
        run = run_dir(context)
        results = review.rt_results(run, self.sent)
        self.body = review.review_body(self.flow, run, self.sent, previews=self._previews(context, run, results),
                                       volumes=self._volumes(run, results))
        who = ", ".join(self.flow.review.reviewers) or "any user who may edit this flow's runs"
        set_run_note(self.flow.dag_id, context["run_id"], f"Waiting for review ({who}): nothing is sent before")
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        answer = super().execute_complete(context, event)  # on Reject: the send tasks are skipped
        made = review.decision(answer["chosen_options"], answer.get("responded_by_user"), answer.get("params_input"),
                               self.flow.review.on_timeout)
        run = run_dir(context)
        manifest.record(run, self.task_id, made.record())  # the task's manifest part
        set_run_note(self.flow.dag_id, context["run_id"], made.note())
        self.log.info("review: %s", made.note())
        return answer

    def _previews(self, context: Context, run: Any, results: list) -> list[tuple[str, str]]:
        return []

    def _volumes(self, run: Any, results: list) -> dict[str, dict[str, float]]:
        return {}
