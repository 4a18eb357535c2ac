"""Routing rules: matching semantics, combination of rules, and validation messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.routing import (
    RoutingDecision,
    RoutingInput,
    RulesError,
    default_rules,
    load_rules,
    parse_rules,
)

REPO = Path(__file__).resolve().parents[2]


def study(
    modalities: set[str] | None = None,
    body_parts: set[str] | None = None,
    calling_ae_title: str = "MODALITY1",
    institution_name: str | None = None,
    series_descriptions: set[str] | None = None,
) -> RoutingInput:
    return RoutingInput(
        modalities=frozenset(modalities or {"CR"}),
        body_parts=frozenset(body_parts or set()),
        calling_ae_title=calling_ae_title,
        institution_name=institution_name,
        series_descriptions=frozenset(series_descriptions or set()),
    )


def rules(body: str, defaults: str = "") -> str:
    """A version-1 rules document with the given (already indented) rules block."""
    return f"version: 1\n{defaults}rules:\n{body}"


def error_of(text: str) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(text, source="site.yaml")
    return str(info.value)


# --- defaults -----------------------------------------------------------------------------------


def test_default_rules_triage_everything_routine_to_all() -> None:
    decision = default_rules().decide(study(modalities={"MR"}))
    assert decision == RoutingDecision(
        pipelines=("triage",), priority="routine", destinations=("*",), matched_rules=()
    )


def test_no_match_gives_file_defaults() -> None:
    text = rules(
        "  - name: ct-only\n    match: {modality: CT}\n    pipelines: [retrieval]\n",
        defaults="defaults:\n  pipelines: []\n  priority: stat\n  destinations: [archive]\n",
    )
    decision = parse_rules(text).decide(study(modalities={"CR"}))
    assert decision.pipelines == ()
    assert decision.priority == "stat"
    assert decision.destinations == ("archive",)
    assert decision.matched_rules == ()


def test_defaults_block_is_optional() -> None:
    decision = parse_rules("version: 1\n").decide(study())
    assert decision == default_rules().decide(study())


def test_rule_omitting_fields_takes_them_from_defaults() -> None:
    text = rules(
        "  - name: all\n    match: {}\n",
        defaults="defaults:\n  pipelines: [retrieval]\n  priority: stat\n  destinations: [a]\n",
    )
    decision = parse_rules(text).decide(study())
    assert decision.pipelines == ("retrieval",)
    assert decision.priority == "stat"
    assert decision.destinations == ("a",)
    assert decision.matched_rules == ("all",)


# --- combining rules ----------------------------------------------------------------------------

THREE_RULES = rules(
    "  - name: first\n    match: {modality: CR}\n"
    "    pipelines: [retrieval]\n    destinations: [b, a]\n"
    "  - name: not-matching\n    match: {modality: MR}\n"
    "    pipelines: [triage]\n    priority: stat\n    destinations: [mr_node]\n"
    "  - name: second\n    match: {}\n"
    "    pipelines: [triage, retrieval]\n    destinations: [a, c]\n"
)


def test_matching_rules_union_in_file_order() -> None:
    decision = parse_rules(THREE_RULES).decide(study(modalities={"CR"}))
    assert decision.matched_rules == ("first", "second")
    assert decision.pipelines == ("retrieval", "triage")
    assert decision.destinations == ("b", "a", "c")
    assert decision.priority == "routine"


def test_final_stops_later_rules() -> None:
    text = rules(
        "  - name: stop\n    match: {modality: CR}\n    pipelines: [triage]\n"
        "    destinations: [a]\n    final: true\n"
        "  - name: later\n    match: {}\n    pipelines: [retrieval]\n    destinations: [b]\n"
    )
    ruleset = parse_rules(text)
    stopped = ruleset.decide(study(modalities={"CR"}))
    assert stopped.matched_rules == ("stop",)
    assert stopped.pipelines == ("triage",)
    assert stopped.destinations == ("a",)
    # final only acts when its rule matches.
    assert ruleset.decide(study(modalities={"CT"})).matched_rules == ("later",)


def test_stat_wins_over_routine() -> None:
    text = rules(
        "  - name: r1\n    match: {}\n    priority: routine\n"
        "  - name: s\n    match: {modality: CR}\n    priority: stat\n"
        "  - name: r2\n    match: {}\n    priority: routine\n"
    )
    ruleset = parse_rules(text)
    assert ruleset.decide(study(modalities={"CR"})).priority == "stat"
    assert ruleset.decide(study(modalities={"CT"})).priority == "routine"


def test_empty_pipelines_runs_nothing() -> None:
    text = rules(
        "  - name: skip-mg\n    match: {modality: MG}\n    pipelines: []\n    destinations: []\n"
        "  - name: ct\n    match: {modality: CT}\n    pipelines: [triage]\n"
    )
    ruleset = parse_rules(text)
    skipped = ruleset.decide(study(modalities={"MG"}))
    assert skipped.pipelines == ()
    assert skipped.matched_rules == ("skip-mg",)
    # An empty-pipeline rule adds nothing when another matching rule has pipelines.
    both = ruleset.decide(study(modalities={"MG", "CT"}))
    assert both.pipelines == ("triage",)


def test_star_destination_absorbs_named_ones() -> None:
    text = rules(
        "  - name: named\n    match: {}\n    destinations: [main_pacs]\n"
        "  - name: everyone\n    match: {}\n    destinations: ['*']\n"
    )
    assert parse_rules(text).decide(study()).destinations == ("*",)


def test_decision_as_dict_is_json_ready() -> None:
    decision = parse_rules(THREE_RULES).decide(study(modalities={"CR"}))
    assert json.loads(json.dumps(decision.as_dict())) == {
        "pipelines": ["retrieval", "triage"],
        "priority": "routine",
        "destinations": ["b", "a", "c"],
        "matched_rules": ["first", "second"],
    }


def test_referenced_names_for_startup_checks() -> None:
    ruleset = parse_rules(THREE_RULES)
    assert ruleset.destination_names == {"*", "a", "b", "c", "mr_node"}
    assert ruleset.pipeline_names == {"triage", "retrieval"}


# --- matching -----------------------------------------------------------------------------------


def matches(match: str, inp: RoutingInput) -> bool:
    text = rules(f"  - name: r\n    match: {match}\n")
    return parse_rules(text).decide(inp).matched_rules == ("r",)


def test_empty_match_matches_everything() -> None:
    assert matches("{}", study(modalities={"OT"}))


def test_modality_case_insensitive_any_of_study() -> None:
    assert matches("{modality: [cr, dx]}", study(modalities={"SR", "CR"}))
    assert not matches("{modality: [CR, DX]}", study(modalities={"CT"}))
    # Exact match, not a substring.
    assert not matches("{modality: [C]}", study(modalities={"CR"}))


def test_body_part_case_insensitive_and_absent_value_does_not_match() -> None:
    assert matches("{body_part_examined: chest}", study(body_parts={"CHEST"}))
    assert not matches("{body_part_examined: CHEST}", study(body_parts=set()))


def test_calling_ae_title_is_case_sensitive() -> None:
    assert matches("{calling_ae_title: ER_CR1}", study(calling_ae_title="ER_CR1"))
    assert not matches("{calling_ae_title: ER_CR1}", study(calling_ae_title="er_cr1"))
    # Padding spaces are not significant in AE titles.
    assert matches("{calling_ae_title: ER_CR1}", study(calling_ae_title="ER_CR1  "))


def test_institution_name_case_insensitive_ignoring_outer_spaces() -> None:
    match = "{institution_name: ['General Hospital']}"
    assert matches(match, study(institution_name="  GENERAL hospital "))
    assert not matches(match, study(institution_name="General Hospital East"))
    assert not matches(match, study(institution_name=None))
    assert not matches(match, study(institution_name="  "))


def test_series_description_regex_searches_any_description() -> None:
    match = r"""{series_description: "(?i)\\b(pa|ap)\\b"}"""
    assert matches(match, study(series_descriptions={"Lateral", "Chest PA"}))
    assert matches(match, study(series_descriptions={"ap portable"}))
    assert not matches(match, study(series_descriptions={"Lateral", "PAtient positioning"}))
    assert not matches(match, study(series_descriptions=set()))


def test_all_keys_must_match() -> None:
    match = "{modality: CR, body_part_examined: CHEST, calling_ae_title: ER}"
    assert matches(match, study({"CR"}, {"CHEST"}, "ER"))
    assert not matches(match, study({"CR"}, {"CHEST"}, "WARD"))
    assert not matches(match, study({"CR"}, {"HAND"}, "ER"))


# --- from_dataset -------------------------------------------------------------------------------


def test_from_dataset_reads_routing_tags_only() -> None:
    ds = Dataset()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.InstitutionName = " General Hospital "
    ds.SeriesDescription = "Chest PA"
    ds.PatientName = "Doe^Jane"
    inp = RoutingInput.from_dataset(ds, calling_ae_title="ER_CR1")
    assert inp == RoutingInput(
        modalities=frozenset({"CR"}),
        body_parts=frozenset({"CHEST"}),
        calling_ae_title="ER_CR1",
        institution_name="General Hospital",
        series_descriptions=frozenset({"Chest PA"}),
    )
    assert "Doe" not in repr(inp)


def test_from_dataset_missing_and_empty_tags_give_no_value() -> None:
    ds = Dataset()
    ds.Modality = "MR"
    ds.BodyPartExamined = ""
    inp = RoutingInput.from_dataset(ds, calling_ae_title="MRI1")
    assert inp.body_parts == frozenset()
    assert inp.institution_name is None
    assert inp.series_descriptions == frozenset()


def test_merge_unions_instances_of_a_study() -> None:
    first = study(modalities={"CT"}, series_descriptions={"Axial"})
    second = study(modalities={"SR"}, series_descriptions={"Report"}, institution_name="X")
    merged = first.merge(second)
    assert merged.modalities == {"CT", "SR"}
    assert merged.series_descriptions == {"Axial", "Report"}
    assert merged.institution_name == "X"


# --- example file and documentation -------------------------------------------------------------


def test_example_file_routes_er_chest_cr_as_its_comments_say() -> None:
    ruleset = load_rules(REPO / "deploy" / "rules.example.yaml")
    ds = Dataset()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    er = ruleset.decide(RoutingInput.from_dataset(ds, calling_ae_title="ER_CR1"))
    assert er.pipelines == ("triage", "retrieval")
    assert er.priority == "stat"
    assert er.destinations == ("main_pacs", "er_viewer")
    assert er.matched_rules == ("er-chest-xray", "chest-xray-similar-cases")

    ward = ruleset.decide(RoutingInput.from_dataset(ds, calling_ae_title="WARD_CR"))
    assert (ward.pipelines, ward.priority, ward.destinations) == (
        ("triage", "retrieval"),
        "routine",
        ("main_pacs",),
    )
    assert ruleset.decide(study(modalities={"MG"})).pipelines == ()
    ct_head = ruleset.decide(study(modalities={"CT"}, body_parts={"HEAD"}))
    assert ct_head == ruleset.defaults


def test_documentation_example_parses() -> None:
    doc = (REPO / "docs" / "routing.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", doc, re.DOTALL)
    assert block is not None
    decision = parse_rules(block.group(1)).decide(
        study({"DX"}, {"CHEST"}, "ER_CR1", "General Hospital", {"CHEST AP"})
    )
    assert decision.matched_rules == ("er-chest-xray",)


# --- errors -------------------------------------------------------------------------------------


def test_missing_file() -> None:
    with pytest.raises(RulesError, match=r"nowhere\.yaml: rules file not found"):
        load_rules(Path("/nonexistent/nowhere.yaml"))


def test_unknown_match_key_names_rule_field_and_allowed_keys() -> None:
    message = error_of(rules("  - name: er\n    match: {modallity: CR}\n"))
    assert "site.yaml" in message
    assert "rule #1 ('er')" in message
    assert "'match.modallity'" in message
    assert "unknown key" in message
    assert "modality" in message.split("allowed keys here:")[1]


def test_unknown_rule_key_and_top_level_key() -> None:
    message = error_of(rules("  - name: er\n    match: {}\n    priorty: stat\n") + "extra: 1\n")
    assert "rule #1 ('er'), field 'priorty': unknown key" in message
    assert "field 'extra': unknown key" in message


def test_invalid_priority() -> None:
    message = error_of(rules("  - name: er\n    match: {}\n    priority: urgent\n"))
    assert "rule #1 ('er'), field 'priority'" in message
    assert "'stat' or 'routine'" in message
    assert "'urgent'" in message


def test_invalid_default_priority() -> None:
    message = error_of("version: 1\ndefaults:\n  priority: high\n")
    assert "field 'defaults.priority'" in message


def test_duplicate_rule_names() -> None:
    message = error_of(rules("  - name: a\n    match: {}\n  - name: a\n    match: {}\n"))
    assert "rule #2 ('a'), field 'name': duplicate rule name" in message
    assert "rule #1" in message


def test_missing_rule_name_is_reported_by_index() -> None:
    message = error_of(rules("  - name: ok\n    match: {}\n  - match: {}\n"))
    assert "rule #2, field 'name': required key is missing" in message


def test_missing_match_is_reported() -> None:
    message = error_of(rules("  - name: nomatch\n    pipelines: [triage]\n"))
    assert "rule #1 ('nomatch'), field 'match': required key is missing" in message


def test_invalid_regex() -> None:
    message = error_of(rules("  - name: rx\n    match: {series_description: '(pa'}\n"))
    assert "rule #1 ('rx'), field 'match.series_description'" in message
    assert "invalid regular expression '(pa'" in message


@pytest.mark.parametrize("version", ["2", "'1'", "0"])
def test_unsupported_version(version: str) -> None:
    message = error_of(f"version: {version}\nrules: []\n")
    assert "field 'version'" in message
    assert "version: 1" in message


def test_missing_version() -> None:
    assert "field 'version': required key is missing" in error_of("rules: []\n")


def test_key_without_value_is_not_match_anything() -> None:
    message = error_of(rules("  - name: half\n    match:\n      modality:\n"))
    assert "rule #1 ('half'), field 'match.modality': the key has no value" in message


def test_empty_match_list_is_rejected() -> None:
    message = error_of(rules("  - name: empty\n    match: {modality: []}\n"))
    assert "rule #1 ('empty'), field 'match.modality'" in message
    assert "the list is empty" in message


def test_yaml_booleans_are_not_accepted_as_names() -> None:
    message = error_of(rules("  - name: norway\n    match: {calling_ae_title: [NO]}\n"))
    assert "rule #1 ('norway'), field 'match.calling_ae_title[0]'" in message
    assert "quote the value" in message


def test_duplicate_yaml_key_is_rejected() -> None:
    message = error_of(rules("  - name: dup\n    match: {modality: CR}\n    match: {}\n"))
    assert "duplicate key 'match'" in message
    assert "line 5" in message


def test_yaml_syntax_error_and_wrong_top_level() -> None:
    assert "not valid YAML" in error_of("version: [1\n")
    assert "site.yaml: the rules file is empty" in error_of("")
    assert "top level" in error_of("- version: 1\n")


def test_all_problems_reported_at_once() -> None:
    message = error_of(
        rules(
            "  - name: a\n    match: {modality: CR}\n    priority: soon\n"
            "  - name: b\n    match: {bodypart: CHEST}\n"
        )
    )
    assert "rule #1 ('a'), field 'priority'" in message
    assert "rule #2 ('b'), field 'match.bodypart'" in message


def test_load_rules_validates_files(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules("  - name: x\n    match: {}\n    final: maybe\n"), encoding="utf-8")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(path) in str(info.value)
    assert "rule #1 ('x'), field 'final'" in str(info.value)


def test_an_unknown_pipeline_is_refused_when_the_rules_load() -> None:
    message = error_of(
        rules("  - name: ct-search\n    match: {modality: [CT]}\n    pipelines: [retreival]\n")
    )
    assert "rule #1 ('ct-search'), field 'pipelines': unknown pipeline 'retreival'" in message
    assert "known: triage, retrieval" in message
    in_defaults = error_of(rules("  []\n", defaults="defaults:\n  pipelines: [triage, sr]\n"))
    assert "defaults, field 'pipelines': unknown pipeline 'sr'" in in_defaults
