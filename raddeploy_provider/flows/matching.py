"""Trigger matching: pure functions over instance headers (keyword -> text value(s)).

Semantics (docs/flows.md, "Matching rules"): a pattern matches the whole value
(``re.fullmatch``) in the native spelling, anywhere in it (``re.search``) in a RadDeploy flow
file (:attr:`~.model.Pattern.match`); ``~`` patterns must not match; a multi-valued tag matches when any value does (an exclusion
excludes when any value matches); a keyword the instance lacks fails every positive pattern
and no exclusion. All conditions of a trigger hold for one instance; every trigger of a
flow must be satisfied by some instance of the study.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

from .model import Condition, Flow, Pattern, Trigger

#: A header as the index stores it: keyword -> text, or a list of texts when multi-valued.
HeaderValue = Union[str, Sequence[str]]
Header = Mapping[str, HeaderValue]

_SHOW_CHARS = 80


def _values(value: HeaderValue) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _check(condition: Condition, header: Header,
           failures: list[tuple[Pattern, HeaderValue | None]] | None = None) -> bool:
    """Does ``condition`` hold for this instance? The one reading of the matching rules.

    With ``failures``, every failing pattern is appended with the value it failed on (None:
    the instance lacks the keyword; an exclusion: the value it matched; else the whole
    value); without, the check stops at the first failure (the listener's hot path).
    """
    raw = header.get(condition.keyword)
    values = None if raw is None else _values(raw)
    holds = True
    for pattern in condition.patterns:
        if values is None:
            if pattern.exclude:
                continue
            value = None
        else:
            hit = None
            for v in values:
                if pattern.hits(v):
                    hit = v
                    break
            if (hit is not None) != pattern.exclude:
                continue
            value = hit if pattern.exclude else raw
        if failures is None:
            return False
        failures.append((pattern, value))
        holds = False
    return holds


def _reason(keyword: str, pattern: Pattern, value: HeaderValue | None) -> str:
    if value is None:
        return f"{keyword}: value missing (pattern {pattern.source!r} needs one)"
    if pattern.exclude:
        return f"{keyword}: exclusion {'~' + pattern.source!r} matched value {_show(value)}"
    shown = f"value {_show(value)}" if isinstance(value, str) else f"values {_show(_values(value))}"
    return f"{keyword}: pattern {pattern.source!r} did not match {shown}"


def _show(value: HeaderValue) -> str:
    """A header value for a reason: quoted (a list for multi-valued tags), cut when long."""
    text = repr(value) if isinstance(value, str) else repr(list(value))
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."


def condition_holds(condition: Condition, header: Header) -> bool:
    """Does this instance's value of ``condition.keyword`` satisfy every pattern?"""
    return _check(condition, header)


def explain(trigger: Trigger, header: Header) -> list[str]:
    """Why this instance does not satisfy ``trigger``, one reason per failing pattern.

    Empty when it does. Reasons name the keyword and what failed: the value is missing, a
    pattern did not match the value, or an exclusion matched it.
    """
    reasons = []
    for condition in trigger.conditions:
        failures: list[tuple[Pattern, HeaderValue | None]] = []
        _check(condition, header, failures)
        reasons += [_reason(condition.keyword, pattern, value) for pattern, value in failures]
    return reasons


def trigger_matches(trigger: Trigger, header: Header) -> bool:
    """All conditions of one trigger hold for this instance."""
    return all(condition_holds(c, header) for c in trigger.conditions)


def matched_triggers(flow: Flow, header: Header) -> list[int]:
    """Indexes of the flow's triggers this instance satisfies (empty: irrelevant to the flow)."""
    return [i for i, t in enumerate(flow.triggers) if trigger_matches(t, header)]


def unmet_triggers(flow: Flow, headers: Iterable[Header]) -> list[int]:
    """Indexes of the triggers no instance in ``headers`` satisfies (empty: study is ready)."""
    unmet = set(range(len(flow.triggers)))
    for header in headers:
        unmet.difference_update(matched_triggers(flow, header))
        if not unmet:
            break
    return sorted(unmet)


def select_inputs(flow: Flow, instances: Sequence[tuple[str, Header]]) -> list[int]:
    """Indexes of the instances a run's ``src`` gets, from ``(SeriesInstanceUID, header)``.

    Instances any trigger matches, plus (with ``input.whole_series``) every other instance
    of a series one of them belongs to, so a model never sees half a series.
    """
    matched = {i for i, (_, header) in enumerate(instances) if matched_triggers(flow, header)}
    if flow.input.whole_series:
        series = {instances[i][0] for i in matched}
        matched |= {i for i, (uid, _) in enumerate(instances) if uid in series}
    return sorted(matched)
