"""ReviewOperator: a person approves a run's results before any send task runs (``review: required``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Context, Param

from raddeploy_provider import review
from raddeploy_provider.flows.model import Flow
from raddeploy_provider.notifications import notify_rejection
from raddeploy_provider.store import RunDir, manifest, read_header
from raddeploy_provider.utils import audit
from raddeploy_provider.utils.run_note import hitl_answer, set_run_note, try_state
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
        kwargs.setdefault("retries", 1)  # for a lost resume: see _lost_answer
        kwargs.setdefault("retry_delay", timedelta(seconds=2))
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
        earlier = self._lost_answer(context, run)
        if earlier is not None:
            return self.execute_complete(context, earlier)
        results = review.rt_results(run, self.sent)
        self.body = review.review_body(self.flow, run, self.sent, previews=self._previews(context, run, results),
                                       volumes=self._volumes(run, results))
        who = ", ".join(self.flow.review.reviewers) or "any user who may edit this flow's runs"
        set_run_note(self.flow.dag_id, context["run_id"], f"Waiting for review ({who}): nothing is sent before")
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        # Recorded first: on Reject, ApprovalOperator skips the send tasks by raising (the task SDK's
        # DownstreamTasksSkipped), so nothing after its execute_complete would run.
        if "error" not in event:
            made = review.decision(event.get("chosen_options") or [], event.get("responded_by_user"),
                                   event.get("params_input"), self.flow.review.on_timeout)
            manifest.record(run_dir(context), self.task_id,  # the task's manifest part, and which try made it
                            {**made.record(), "try": context["ti"].try_number})
            audit.record(context, "review", outcome="success" if made.approved else "minor_failure", actor=made.by,
                         decision="approved" if made.approved else "rejected")
            set_run_note(self.flow.dag_id, context["run_id"], made.note())
            self.log.info("review: %s", made.note())
            if not made.approved:  # who, never the reviewer's words: those may name the patient
                notify_rejection(context, self.flow, made.by, timed_out=made.by == "timeout")
        return super().execute_complete(context, event)

    def _lost_answer(self, context: Context, run: RunDir) -> dict[str, Any] | None:
        """An answer a reviewer gave that was never applied, so that the reviewer is not asked again
        (and the run does not wait out its review_timeout): Airflow 3.3 can lose the resume of a
        task answered within moments of parking. Seen two ways: the executor's late exit report for
        the parked try marks the resumed task failed (the retry finds the answer on the try before),
        or the task runs ``execute`` again instead of ``execute_complete`` (the answer is on this
        try, and asking again would overwrite it). A decision that was applied (in the manifest) is
        never reused: clearing the review task after a decision asks again; but a third way is: the
        try that applied the answer failed to report its end to Airflow ("Failed to report terminal
        task state"), which then failed and retried it, and its retry applies that answer again."""
        try_number = context["ti"].try_number
        applied = manifest.assemble(run)["tasks"].get(self.task_id)
        if applied is not None:
            before = applied.get("try")
            if before != try_number - 1 or try_state(self.flow.dag_id, context["run_id"], self.task_id,
                                                     before) not in ("failed", "up_for_retry"):
                return None  # decided on a try that ended: a person cleared the review to be asked again
            answer = hitl_answer(self.flow.dag_id, context["run_id"], self.task_id, before)
            if answer is not None:
                self.log.warning("try %d applied its answer but its end was lost (Airflow failed and retried it): "
                                 "applying that answer again", before)
            return answer
        for earlier in (try_number, try_number - 1):
            if earlier < 1:
                continue
            answer = hitl_answer(self.flow.dag_id, context["run_id"], self.task_id, earlier)
            if answer is not None:
                self.log.warning("try %d was answered but not applied (Airflow lost its resume): applying that "
                                 "answer", earlier)
                return answer
        return None

    def _previews(self, context: Context, run: RunDir, results: list[Path]) -> list[tuple[str, str]]:
        """Pictures of the first RT result on its images, as (title, URL) for the body; none when
        there is no RT result or it cannot be drawn (said in the log, the review goes on)."""
        from raddeploy_provider.plugins.previews import preview_url
        from raddeploy_provider.previews import PreviewError, render_previews

        if not results:
            return []
        if len(results) > 1:
            self.log.info("previews of %s only (of %d RT results)", results[0].name, len(results))
        try:
            made = render_previews(results[0], _images(run, results[0]), run.previews)
        except (PreviewError, OSError, ValueError) as exc:
            self.log.warning("no previews of %s: %s", results[0].name, exc)
            return []
        return [(path.stem.replace("_", " "), preview_url(self.flow.dag_id, context["run_id"], path.name))
                for path in made]

    def _volumes(self, run: RunDir, results: list[Path]) -> dict[str, dict[str, float]]:
        """ROI (or segment) name -> cm³, per RT result file; a result that cannot be read has none."""
        from raddeploy_provider.dicom import rt

        found = {}
        for path in results:
            try:
                images = _images(run, path)
                sop_class = str(read_header(path).sop_class_uid)
                found[path.name] = (rt.segment_volumes_cm3(path, images) if sop_class == review.SEG
                                    else rt.roi_volumes_cm3(path, images))
            except Exception as exc:  # a result the model wrote wrongly: the reviewer sees it without volumes
                self.log.warning("no volumes of %s: %s", path.name, exc)
        return found


def _images(run: RunDir, result: Path) -> list[Path]:
    """The input files of the series ``result`` references (all input files when it names none):
    the images an RT result is drawn on and measured against."""
    from pydicom import dcmread

    ds = dcmread(result, stop_before_pixels=True)
    wanted = {str(series.SeriesInstanceUID) for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
              for study in frame.get("RTReferencedStudySequence", []) for series in study.get("RTReferencedSeriesSequence", [])}
    wanted |= {str(series.SeriesInstanceUID) for series in ds.get("ReferencedSeriesSequence", [])}
    files = sorted(p for p in run.input.rglob("*") if p.is_file())
    if not wanted:
        return files
    chosen = []
    for path in files:
        try:
            if read_header(path).series_uid in wanted:
                chosen.append(path)
        except Exception:
            continue
    return chosen
