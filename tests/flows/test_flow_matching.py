"""Trigger matching on instance headers (keyword -> text, or list of texts when multi-valued)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from raddeploy_provider.flows import Flow, load_flow, matched_triggers, trigger_matches, unmet_triggers
from raddeploy_provider.flows.matching import select_inputs


@pytest.fixture
def make_flow(tmp_path: Path):
    """Load a flow whose ``triggers:`` (and optional ``input:``) section is given as YAML; native
    spelling unless ``raddeploy`` (its one model then has ``docker_kwargs``)."""
    count = 0

    def make(triggers: str, input_section: str = "", raddeploy: bool = False) -> Flow:
        nonlocal count
        count += 1
        model = "{docker_kwargs: {image: a}}" if raddeploy else "{image: a}"
        text = (f"name: f{count}\ntriggers:\n{textwrap.indent(textwrap.dedent(triggers).strip(), '  ')}\n"
                f"{textwrap.dedent(input_section).strip()}\nmodels: [{model}]\n")
        path = tmp_path / f"f{count}.yaml"
        path.write_text(text)
        return load_flow(path)

    return make


CT_HEAD = {"Modality": "CT", "SeriesDescription": "Head and Neck 2mm", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
CT_SCOUT = {"Modality": "CT", "SeriesDescription": "HEAD scout", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
MR_T1 = {"Modality": "MR", "SeriesDescription": "T1 MPRAGE"}
RTSTRUCT = {"Modality": "RTSTRUCT"}


def test_all_keywords_of_one_trigger_must_hold_for_the_same_instance(make_flow) -> None:
    flow = make_flow("- {Modality: CT, SeriesDescription: '(?i)head.*'}")
    trigger = flow.triggers[0]
    assert trigger_matches(trigger, CT_HEAD)
    assert not trigger_matches(trigger, {"Modality": "CT", "SeriesDescription": "Pelvis"})
    assert not trigger_matches(trigger, {"Modality": "MR", "SeriesDescription": "Head"})
    # the two halves held by two different instances is not a match
    assert unmet_triggers(flow, [{"Modality": "CT", "SeriesDescription": "Pelvis"},
                                 {"Modality": "MR", "SeriesDescription": "Head"}]) == [0]


def test_exclusion(make_flow) -> None:
    flow = make_flow("- {Modality: CT, SeriesDescription: '~(?i).*scout.*'}")
    assert matched_triggers(flow, CT_HEAD) == [0]
    assert matched_triggers(flow, CT_SCOUT) == []


def test_list_of_patterns_must_all_hold(make_flow) -> None:
    flow = make_flow("- SeriesDescription: ['(?i).*(head|neck).*', '~(?i).*scout.*', '.*2mm']")
    assert matched_triggers(flow, CT_HEAD) == [0]
    assert matched_triggers(flow, CT_SCOUT) == []  # excluded
    assert matched_triggers(flow, {"SeriesDescription": "Head and Neck 3mm"}) == []  # 2mm fails


def test_native_patterns_match_the_whole_value_case_sensitive_unless_asked(make_flow) -> None:
    flow = make_flow("""
        - SeriesDescription: neck
        - SeriesDescription: (?i).*neck
        - SeriesDescription: Head|Neck
        - SeriesDescription: (?i)head.*
    """)
    assert matched_triggers(flow, {"SeriesDescription": "Head and neck"}) == [1, 3]
    assert matched_triggers(flow, {"SeriesDescription": "HEAD AND NECK"}) == [1, 3]
    assert matched_triggers(flow, {"SeriesDescription": "Head"}) == [2, 3]
    assert matched_triggers(flow, {"SeriesDescription": "neck"}) == [0, 1]
    # "CT" is the value CT, never the CT inside RTSTRUCT; alternatives are whole values too
    assert matched_triggers(make_flow("- Modality: CT"), RTSTRUCT) == []
    assert matched_triggers(make_flow("- Modality: CT|MR"), MR_T1) == [0]
    assert matched_triggers(make_flow("- Modality: CT|MR"), RTSTRUCT) == []


def test_raddeploy_patterns_search_anywhere_in_the_value(make_flow) -> None:
    """A RadDeploy flow file keeps RadDeploy's unanchored search, so it loads and runs as it did."""
    flow = make_flow("""
        - SeriesDescription: neck
        - SeriesDescription: (?i)neck
        - SeriesDescription: ^Head$
    """, raddeploy=True)
    assert matched_triggers(flow, {"SeriesDescription": "Head and neck"}) == [0, 1]
    assert matched_triggers(flow, {"SeriesDescription": "HEAD AND NECK"}) == [1]
    assert matched_triggers(flow, {"SeriesDescription": "Head"}) == [2]
    # "CT" is found inside "RTSTRUCT" there, which validate warns of (tests/flows/test_flow_schema.py)
    assert matched_triggers(make_flow("- Modality: CT", raddeploy=True), RTSTRUCT) == [0]
    assert matched_triggers(make_flow("- Modality: ^CT$", raddeploy=True), RTSTRUCT) == []


def test_missing_keyword_fails_a_positive_pattern_and_does_not_exclude(make_flow) -> None:
    flow = make_flow("""
        - {Modality: CT, ContrastBolusAgent: '.*'}
        - {Modality: CT, ContrastBolusAgent: '~(?i)iodine.*'}
    """)
    header = {"Modality": "CT"}
    assert matched_triggers(flow, header) == [1]
    assert matched_triggers(flow, {**header, "ContrastBolusAgent": "Iodine 300"}) == [0]
    assert matched_triggers(flow, {**header, "ContrastBolusAgent": "none"}) == [0, 1]


def test_multi_valued_tags(make_flow) -> None:
    flow = make_flow("""
        - ImageType: ORIGINAL
        - ImageType: ~LOCALIZER
        - ImageType: ^AXIAL$
        - ImageType: ORIGINAL\\\\PRIMARY
    """)
    # any value matches a positive pattern; an exclusion excludes when any value matches
    assert matched_triggers(flow, CT_HEAD) == [0, 1, 2]
    assert matched_triggers(flow, CT_SCOUT) == [0]
    # a value is matched on its own, never on a joined string representation
    assert matched_triggers(flow, {"ImageType": ["DERIVED", "SECONDARY"]}) == [1]
    assert matched_triggers(flow, {"ImageType": []}) == [1]
    # a single-valued tag is a plain string, not a list of characters
    assert matched_triggers(flow, {"ImageType": "AXIAL"}) == [1, 2]


def test_exclusion_and_inclusion_on_a_multi_valued_tag(make_flow) -> None:
    flow = make_flow("- ImageType: [ORIGINAL, ~LOCALIZER]")
    assert matched_triggers(flow, CT_HEAD) == [0]
    assert matched_triggers(flow, CT_SCOUT) == []


def test_numbers_are_matched_as_text(make_flow) -> None:
    flow = make_flow("- {SeriesNumber: ^1$, SliceThickness: ^2.5$}")
    assert matched_triggers(flow, {"SeriesNumber": "1", "SliceThickness": "2.5"}) == [0]
    assert matched_triggers(flow, {"SeriesNumber": "11", "SliceThickness": "2.5"}) == []


def test_every_trigger_must_be_met_by_some_instance(make_flow) -> None:
    flow = make_flow("""
        - {Modality: CT, SeriesDescription: "~(?i).*scout.*"}
        - {Modality: MR, SeriesDescription: "(?i)t1.*"}
        - Modality: RTSTRUCT
    """)
    assert unmet_triggers(flow, []) == [0, 1, 2]
    assert unmet_triggers(flow, [CT_SCOUT]) == [0, 1, 2]
    assert unmet_triggers(flow, [CT_SCOUT, CT_HEAD]) == [1, 2]
    assert unmet_triggers(flow, [MR_T1, CT_HEAD]) == [2]
    # different triggers met by different series (possibly different associations)
    assert unmet_triggers(flow, [MR_T1, CT_SCOUT, RTSTRUCT, CT_HEAD]) == []
    # a generator works too (the index streams headers)
    assert unmet_triggers(flow, (h for h in [RTSTRUCT, MR_T1, CT_HEAD])) == []


def test_one_instance_can_meet_several_triggers(make_flow) -> None:
    flow = make_flow("""
        - Modality: CT
        - SeriesDescription: (?i).*neck.*
    """)
    assert matched_triggers(flow, CT_HEAD) == [0, 1]
    assert unmet_triggers(flow, [CT_HEAD]) == []


def _instances() -> list[tuple[str, dict]]:
    return [
        ("1.1", {**CT_HEAD, "InstanceNumber": "1"}),
        ("1.1", {**CT_HEAD, "InstanceNumber": "2", "ImageType": ["DERIVED", "SECONDARY"]}),
        ("1.2", CT_SCOUT),
        ("1.3", MR_T1),
        ("1.3", {"Modality": "MR", "SeriesDescription": "T1 MPRAGE", "ImageType": ["DERIVED"]}),
        ("1.4", RTSTRUCT),
    ]


def test_select_inputs_whole_series(make_flow) -> None:
    flow = make_flow("- ImageType: ORIGINAL", "input: {whole_series: true}")
    # instance 1 and 4 do not match, but their series does
    assert select_inputs(flow, _instances()) == [0, 1, 2]
    flow = make_flow("- ImageType: ORIGINAL\n- Modality: MR", "input: {whole_series: true}")
    assert select_inputs(flow, _instances()) == [0, 1, 2, 3, 4]


def test_select_inputs_matched_instances_only(make_flow) -> None:
    flow = make_flow("- ImageType: ORIGINAL\n- {Modality: MR, ImageType: ~DERIVED}", "input: {whole_series: false}")
    assert select_inputs(flow, _instances()) == [0, 2, 3]


def test_select_inputs_nothing_matched(make_flow) -> None:
    flow = make_flow("- Modality: PT")
    assert select_inputs(flow, _instances()) == []
    assert select_inputs(flow, []) == []


def test_explain_says_which_pattern_failed_and_why(make_flow) -> None:
    from raddeploy_provider.flows import explain

    flow = make_flow("""
        - Modality: CT
          SeriesDescription: ['(?i)head.*', '~(?i).*scout']
          BodyPartExamined: HEAD
          ImageType: DERIVED
        """)
    trigger = flow.triggers[0]
    assert explain(trigger, CT_SCOUT) == [
        "SeriesDescription: exclusion '~(?i).*scout' matched value 'HEAD scout'",
        "BodyPartExamined: value missing (pattern 'HEAD' needs one)",
        "ImageType: pattern 'DERIVED' did not match values ['ORIGINAL', 'PRIMARY', 'LOCALIZER']",
    ]
    assert explain(trigger, MR_T1) == [
        "Modality: pattern 'CT' did not match value 'MR'",
        "SeriesDescription: pattern '(?i)head.*' did not match value 'T1 MPRAGE'",
        "BodyPartExamined: value missing (pattern 'HEAD' needs one)",
        "ImageType: value missing (pattern 'DERIVED' needs one)",
    ]
    long = {**CT_HEAD, "Modality": "M" * 200}
    assert explain(trigger, long)[0] == f"Modality: pattern 'CT' did not match value '{'M' * 76}..."
    matching = {**CT_HEAD, "BodyPartExamined": "HEAD", "ImageType": ["DERIVED", "SECONDARY"]}
    assert explain(trigger, matching) == []


def test_explain_and_matching_agree(make_flow) -> None:
    from raddeploy_provider.flows import explain

    outcomes = set()
    for raddeploy in (False, True):  # both ways of matching a pattern
        flow = make_flow("""
            - {Modality: CT, SeriesDescription: '~(?i)scout'}
            - {Modality: MR, SeriesDescription: ['(?i)t1.*', '~(?i)post']}
            - {ImageType: LOCALIZER}
            - {Modality: RT}
            """, raddeploy=raddeploy)
        for header in (CT_HEAD, CT_SCOUT, MR_T1, RTSTRUCT, {}, {"Modality": ["CT", "MR"]}):
            for trigger in flow.triggers:
                matches = trigger_matches(trigger, header)
                assert matches == (explain(trigger, header) == [])
                outcomes.add((raddeploy, matches))
    assert len(outcomes) == 4  # each spelling both matched and failed some
