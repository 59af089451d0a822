"""Trigger matching: pure functions over instance headers (keyword -> text value(s)).

Semantics (``../shared/design/flow-format.md``): a pattern is an unanchored ``re.search``;
``~`` patterns must not match; a multi-valued tag matches when any value does (an exclusion
excludes when any value matches); a keyword the instance lacks fails every positive pattern
and no exclusion. All conditions of a trigger hold for one instance; every trigger of a
flow must be satisfied by some instance of the study.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

from .model import Condition, Flow, Trigger

#: A header as the index stores it: keyword -> text, or a list of texts when multi-valued.
HeaderValue = Union[str, Sequence[str]]
Header = Mapping[str, HeaderValue]


def _values(value: HeaderValue) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def condition_holds(condition: Condition, header: Header) -> bool:
    """Does this instance's value of ``condition.keyword`` satisfy every pattern?"""
    raw = header.get(condition.keyword)
    values = None if raw is None else _values(raw)
    for pattern in condition.patterns:
        if values is None:
            if not pattern.exclude:
                return False
            continue
        hit = any(pattern.regex.search(v) for v in values)
        if hit == pattern.exclude:
            return False
    return True


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
