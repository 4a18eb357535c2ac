"""7-day ER revisit risk: encounter data (the synthetic cohort and the CSV export format)."""

from plugin.revisit.cohort import (
    COLUMNS,
    CohortFileError,
    EncounterRow,
    GoldMention,
    SiteProfile,
    SyntheticEncounter,
    make_sites,
    read_cohort_csv,
    revisit_rates,
    synth_annotated_cohort,
    synth_cohort,
    write_cohort_csv,
)

__all__ = [
    "COLUMNS",
    "CohortFileError",
    "EncounterRow",
    "GoldMention",
    "SiteProfile",
    "SyntheticEncounter",
    "make_sites",
    "read_cohort_csv",
    "revisit_rates",
    "synth_annotated_cohort",
    "synth_cohort",
    "write_cohort_csv",
]
