"""Standard codes for findings: the bundle's own, else a default for common chest findings.

Viewers and PACS reporting tools group and label findings by code; a private scheme is
meaningful to nobody else. A bundle's finding may carry a code (bundle.json `code`); without
one, the finding's name is looked up in the project lexicon (plugin/concepts/lexicon.py),
which gives SNOMED CT where it has a concept and RadLex where SNOMED has none. A name found
nowhere keeps pacsclip's local scheme (plugin/results/sr.py).
"""

from __future__ import annotations

from functools import cache
from typing import Final

from plugin.concepts.lexicon import default_lexicon
from plugin.results.study_result import FindingCode

SNOMED: Final = "SCT"
RADLEX: Final = "RADLEX"


def default_finding_code(name: str) -> FindingCode | None:
    """The code of a finding called `name` ("pleural_effusion", "nodule"), or None."""
    return _lexicon_codes().get(name.replace("_", " ").strip().lower())


def finding_code(name: str, declared: FindingCode | None) -> FindingCode | None:
    """The bundle's declared code when it has one, else the default for the name."""
    return declared if declared is not None else default_finding_code(name)


@cache
def _lexicon_codes() -> dict[str, FindingCode]:
    codes: dict[str, FindingCode] = {}
    for concept in default_lexicon():
        meaning = concept.name[:1].upper() + concept.name[1:]
        if concept.snomed_ct is not None:
            code = FindingCode(concept.snomed_ct, SNOMED, meaning)
        elif concept.radlex is not None:
            code = FindingCode(concept.radlex, RADLEX, meaning)
        else:
            continue
        for phrase in concept.phrases:
            codes.setdefault(phrase.lower(), code)
    return codes
