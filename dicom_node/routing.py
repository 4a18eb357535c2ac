"""Routing rules: which pipelines run on a completed study, how urgently, and where results go.

The rules come from a YAML file written by the site's PACS administrator (see docs/routing.md).
They are validated once at load, so a typo is reported with the file, rule and field at start-up
instead of silently routing studies the wrong way. Deciding is pure: tags in, a decision out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails
from pydicom import Dataset
from pydicom.multival import MultiValue

from plugin.pipelines import PIPELINES

if TYPE_CHECKING:
    from plugin.catalog.repository import StudyFacts

logger = logging.getLogger(__name__)

STAT: Final = "stat"
ROUTINE: Final = "routine"
ALL_DESTINATIONS: Final = "*"

Priority = Literal["stat", "routine"]
_Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class RulesError(ValueError):
    """A rules file that cannot be used; the message says where the problem is and how to fix it."""


# --- decision inputs and outputs ----------------------------------------------------------------


@dataclass(frozen=True)
class RoutingInput:
    """The study attributes rules can match on; no patient identifiers on purpose."""

    modalities: frozenset[str]
    body_parts: frozenset[str]
    calling_ae_title: str
    institution_name: str | None
    series_descriptions: frozenset[str]

    @classmethod
    def from_dataset(cls, ds: Dataset, calling_ae_title: str) -> RoutingInput:
        """Build the input from one instance's tags (missing or empty tags give no value)."""
        return cls(
            modalities=_tag_values(ds, "Modality"),
            body_parts=_tag_values(ds, "BodyPartExamined"),
            calling_ae_title=calling_ae_title.strip(),
            institution_name=min(_tag_values(ds, "InstitutionName"), default=None),
            series_descriptions=_tag_values(ds, "SeriesDescription"),
        )

    @classmethod
    def of_study(cls, facts: StudyFacts) -> RoutingInput:
        """The input of a cataloged study: the values of all its series."""
        return cls(
            modalities=facts.modalities,
            body_parts=facts.body_parts,
            calling_ae_title=facts.calling_ae_title,
            institution_name=facts.institution_name,
            series_descriptions=facts.series_descriptions,
        )

    def merge(self, other: RoutingInput) -> RoutingInput:
        """Combine two instances of the same study; the first institution name seen is kept."""
        return RoutingInput(
            modalities=self.modalities | other.modalities,
            body_parts=self.body_parts | other.body_parts,
            calling_ae_title=self.calling_ae_title,
            institution_name=self.institution_name or other.institution_name,
            series_descriptions=self.series_descriptions | other.series_descriptions,
        )


def _tag_values(ds: Dataset, keyword: str) -> frozenset[str]:
    """Non-empty, stripped string values of a tag; multi-valued tags give all their values."""
    value: Any = ds.get(keyword)
    if value is None:
        return frozenset()
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    return frozenset(text for item in items if (text := str(item).strip()))


@dataclass(frozen=True)
class RoutingDecision:
    """What to do with a study; `destinations == ("*",)` means every configured destination."""

    pipelines: tuple[str, ...]
    priority: str
    destinations: tuple[str, ...]
    matched_rules: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "pipelines": list(self.pipelines),
            "priority": self.priority,
            "destinations": list(self.destinations),
            "matched_rules": list(self.matched_rules),
        }


# --- compiled rules -----------------------------------------------------------------------------


def _fold(text: str) -> str:
    return text.strip().casefold()


def _wanted(values: frozenset[str] | None, have: Iterable[str]) -> bool:
    """An absent criterion matches anything; a present one needs at least one common value."""
    return values is None or not values.isdisjoint(have)


@dataclass(frozen=True)
class Rule:
    """One validated rule with its criteria normalised for matching (None: key absent)."""

    name: str
    modalities: frozenset[str] | None  # casefolded
    body_parts: frozenset[str] | None  # casefolded
    calling_ae_titles: frozenset[str] | None  # case kept: AE titles are case-sensitive
    institution_names: frozenset[str] | None  # casefolded
    series_patterns: tuple[re.Pattern[str], ...] | None
    pipelines: tuple[str, ...]
    priority: str
    destinations: tuple[str, ...]
    final: bool

    def matches(self, inp: RoutingInput) -> bool:
        return (
            _wanted(self.modalities, (_fold(m) for m in inp.modalities))
            and _wanted(self.body_parts, (_fold(b) for b in inp.body_parts))
            and _wanted(self.calling_ae_titles, [inp.calling_ae_title.strip()])
            and _wanted(self.institution_names, _institution(inp))
            and self._series_matches(inp.series_descriptions)
        )

    def _series_matches(self, descriptions: frozenset[str]) -> bool:
        if self.series_patterns is None:
            return True
        return any(p.search(d) for p in self.series_patterns for d in descriptions)


def _institution(inp: RoutingInput) -> list[str]:
    name = _fold(inp.institution_name or "")
    return [name] if name else []


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Union keeping first-seen order (dict keys preserve insertion order)."""
    return tuple(dict.fromkeys(item for group in groups for item in group))


@dataclass(frozen=True)
class RuleSet:
    """Rules in file order plus the decision given when none matches."""

    rules: tuple[Rule, ...]
    defaults: RoutingDecision
    source: str = "<string>"

    def decide(self, inp: RoutingInput) -> RoutingDecision:
        matched = self._matching(inp)
        if not matched:
            return self.defaults
        destinations = _union(r.destinations for r in matched)
        if ALL_DESTINATIONS in destinations:  # "*" already covers every named destination
            destinations = (ALL_DESTINATIONS,)
        return RoutingDecision(
            pipelines=_union(r.pipelines for r in matched),
            priority=STAT if any(r.priority == STAT for r in matched) else ROUTINE,
            destinations=destinations,
            matched_rules=tuple(r.name for r in matched),
        )

    def _matching(self, inp: RoutingInput) -> list[Rule]:
        matched: list[Rule] = []
        for rule in self.rules:
            if rule.matches(inp):
                matched.append(rule)
                if rule.final:
                    break
        return matched

    @property
    def destination_names(self) -> frozenset[str]:
        """Every destination name the rules can produce, to check against the configured nodes."""
        groups = [self.defaults.destinations, *(r.destinations for r in self.rules)]
        return frozenset(_union(groups))

    @property
    def pipeline_names(self) -> frozenset[str]:
        """Every pipeline name the rules can produce, to check against the known pipelines."""
        return frozenset(_union([self.defaults.pipelines, *(r.pipelines for r in self.rules)]))


def default_rules() -> RuleSet:
    """Used when no rules file is configured: triage everything, routine, to every destination."""
    return RuleSet(rules=(), defaults=_builtin_defaults(), source="<built-in defaults>")


def _builtin_defaults() -> RoutingDecision:
    return RoutingDecision(
        pipelines=("triage",),
        priority=ROUTINE,
        destinations=(ALL_DESTINATIONS,),
        matched_rules=(),
    )


# --- YAML schema (pydantic) ---------------------------------------------------------------------


def _reject_null(value: object) -> object:
    # `modality:` with nothing after it loads as null; treating that as "absent" would turn a
    # half-written criterion into "match everything".
    if value is None:
        raise ValueError("the key has no value; give a value or remove the key")
    return value


def _as_list(value: object) -> object:
    """A single value is shorthand for a one-item list."""
    value = _reject_null(value)
    return value if isinstance(value, list) else [value]


class _Schema(BaseModel):
    # strict: YAML turns `yes`, `no` and bare numbers into bool/int; those must not pass as names.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _MatchModel(_Schema):
    modality: list[_Name] | None = Field(default=None, min_length=1)
    body_part_examined: list[_Name] | None = Field(default=None, min_length=1)
    calling_ae_title: list[_Name] | None = Field(default=None, min_length=1)
    institution_name: list[_Name] | None = Field(default=None, min_length=1)
    series_description: list[str] | None = Field(default=None, min_length=1)

    lists_from_scalars = field_validator("*", mode="before")(_as_list)

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"invalid regular expression {pattern!r} ({exc}); fix the pattern, and in "
                    "double-quoted YAML write a backslash as \\\\"
                ) from exc
        return patterns


class _DefaultsModel(_Schema):
    pipelines: list[_Name] = Field(default_factory=lambda: ["triage"])
    priority: Priority = ROUTINE
    destinations: list[_Name] = Field(default_factory=lambda: [ALL_DESTINATIONS])

    lists_from_scalars = field_validator("pipelines", "destinations", mode="before")(_as_list)
    no_nulls = field_validator("priority", mode="before")(_reject_null)


class _RuleModel(_Schema):
    name: _Name
    match: _MatchModel
    # None: omitted in the file, so the value is taken from `defaults`.
    pipelines: list[_Name] | None = None
    priority: Priority | None = None
    destinations: list[_Name] | None = None
    final: bool = False

    lists_from_scalars = field_validator("pipelines", "destinations", mode="before")(_as_list)
    no_nulls = field_validator("name", "match", "priority", "final", mode="before")(_reject_null)


class _FileModel(_Schema):
    version: Literal[1]
    defaults: _DefaultsModel = Field(default_factory=_DefaultsModel)
    rules: list[_RuleModel] = Field(default_factory=list)

    no_nulls = field_validator("defaults", "rules", mode="before")(_reject_null)


# --- loading ------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would otherwise silently overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}; keep only one",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rules file; every problem is raised as RulesError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RulesError(f"{path}: rules file not found; check the configured path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot read the rules file ({exc})") from exc
    rules = parse_rules(text, source=str(path))
    logger.info("loaded %d routing rules from %s", len(rules.rules), path)
    return rules


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """Validate rules given as YAML text; `source` names the file in error messages."""
    data = _load_yaml(text, source)
    try:
        model = _FileModel.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_describe(exc, data, source)) from exc
    _check_unique_names(model, source)
    _check_pipelines(model, source)
    defaults = RoutingDecision(
        pipelines=tuple(model.defaults.pipelines),
        priority=model.defaults.priority,
        destinations=tuple(model.defaults.destinations),
        matched_rules=(),
    )
    rules = tuple(_compile(rule, defaults) for rule in model.rules)
    return RuleSet(rules=rules, defaults=defaults, source=source)


def _load_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        # A SafeLoader subclass: plain data only, never arbitrary Python objects.
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RulesError(
            f"{source}: not valid YAML; fix the syntax at the place shown:\n{exc}"
        ) from exc
    if data is None:
        raise RulesError(f"{source}: the rules file is empty; start it with 'version: 1'")
    if not isinstance(data, dict):
        raise RulesError(
            f"{source}: expected a mapping with 'version: 1' and 'rules:' at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def _check_unique_names(model: _FileModel, source: str) -> None:
    first_index: dict[str, int] = {}
    for index, rule in enumerate(model.rules):
        if rule.name in first_index:
            raise RulesError(
                f"{source}: {_rule_label(index, rule.name)}, field 'name': duplicate rule name, "
                f"already used by rule #{first_index[rule.name] + 1}; give each rule its own name"
            )
        first_index[rule.name] = index


def _check_pipelines(model: _FileModel, source: str) -> None:
    places = [("defaults", model.defaults.pipelines)]
    places += [(_rule_label(i, r.name), r.pipelines or []) for i, r in enumerate(model.rules)]
    for where, names in places:
        unknown = [n for n in names if n not in PIPELINES]
        if unknown:
            raise RulesError(
                f"{source}: {where}, field 'pipelines': unknown pipeline {unknown[0]!r}; "
                f"known: {', '.join(PIPELINES)}"
            )


def _compile(rule: _RuleModel, defaults: RoutingDecision) -> Rule:
    match = rule.match
    return Rule(
        name=rule.name,
        modalities=_folded(match.modality),
        body_parts=_folded(match.body_part_examined),
        calling_ae_titles=_kept(match.calling_ae_title),
        institution_names=_folded(match.institution_name),
        series_patterns=(
            None
            if match.series_description is None
            else tuple(re.compile(p) for p in match.series_description)
        ),
        # Omitted in the rule: taken from `defaults`.
        pipelines=_tuple_or(rule.pipelines, defaults.pipelines),
        priority=rule.priority or defaults.priority,
        destinations=_tuple_or(rule.destinations, defaults.destinations),
        final=rule.final,
    )


def _folded(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(_fold(v) for v in values)


def _tuple_or(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return default if values is None else tuple(values)


def _kept(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


# --- error messages -----------------------------------------------------------------------------

_HINTS = {
    "missing": "required key is missing; add it",
    "string_type": "expected text; quote the value in YAML (bare yes/no/on/off and numbers are "
    "not text)",
    "too_short": "the list is empty; give at least one value, or remove the key to match anything",
    "model_type": "expected a mapping of 'key: value' entries",
    "dict_type": "expected a mapping of 'key: value' entries",
    "list_type": "expected a list, e.g. [A, B]",
    "bool_type": "expected true or false",
}


def _describe(exc: ValidationError, data: dict[str, Any], source: str) -> str:
    problems = [_describe_one(err, data) for err in exc.errors(include_url=False)]
    return f"{source}: invalid routing rules:\n" + "\n".join(f"  - {p}" for p in problems)


def _describe_one(err: ErrorDetails, data: dict[str, Any]) -> str:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    in_rule = len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int)
    where = ""
    if in_rule:
        index = int(loc[1])
        where = _rule_label(index, _raw_rule_name(data, index)) + ", "
        loc = loc[2:]
    field = _format_loc(loc) or "(the rule itself)"
    return f"{where}field '{field}': {_hint(err, loc, in_rule)}"


def _hint(err: ErrorDetails, loc: tuple[int | str, ...], in_rule: bool) -> str:
    kind = str(err["type"])
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc[:-1], in_rule))
        return f"unknown key; check the spelling (allowed keys here: {allowed})"
    if kind == "literal_error" and loc == ("version",):
        return "unsupported version; this format is 'version: 1'"
    if kind == "literal_error":
        return f"{err['msg']} (got {err['input']!r})"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return _HINTS.get(kind, str(err["msg"]))


def _allowed_keys(parent: tuple[int | str, ...], in_rule: bool) -> list[str]:
    """Keys of the mapping that holds an unknown key; `parent` is relative to the rule if in one."""
    if in_rule:
        model: type[BaseModel] = _MatchModel if parent == ("match",) else _RuleModel
    else:
        model = _DefaultsModel if parent == ("defaults",) else _FileModel
    return list(model.model_fields)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _rule_label(index: int, name: str | None) -> str:
    return f"rule #{index + 1} ({name!r})" if name else f"rule #{index + 1}"


def _raw_rule_name(data: dict[str, Any], index: int) -> str | None:
    """The rule's name as written, for messages about a rule that did not validate."""
    rules = data.get("rules")
    if isinstance(rules, list) and index < len(rules) and isinstance(rules[index], dict):
        name = rules[index].get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    return None
