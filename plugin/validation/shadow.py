"""Shadow models: candidates that score every study beside the live model, for validation only.

A shadow model's triage is recorded as an analysis with role "shadow": findings and the
out-of-distribution status, nothing else. It builds no SR or overlay, creates no dispatch job,
raises no flag, webhook or HL7 message, and never changes the study's state or priority, so
nothing of it can leave pacsclip.
"""

from __future__ import annotations

import logging
import time

from plugin.analysis import finding_rows, read_study
from plugin.catalog.analyses import (
    NewAnalysis,
    find_analysis,
    record_shadow_analysis,
    study_to_analyse,
)
from plugin.catalog.db import Catalog
from plugin.inference import TriageModel
from plugin.models.registry import ShadowModel
from plugin.settings import Settings

logger = logging.getLogger(__name__)


class ShadowAnalyser:
    def __init__(
        self, settings: Settings, catalog: Catalog, model: TriageModel, shadow: ShadowModel
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.model = model
        self.shadow = shadow

    def analyse(self, study_uid: str, generation: int) -> bool:
        """Score the study if this shadow covers its site and has not scored this generation;
        True when a new shadow analysis was recorded."""
        bundle = self.model.bundle
        with self.catalog.sessions() as session:
            study = study_to_analyse(session, study_uid)
            if not self.shadow.covers(study.site_key):
                return False
            if find_analysis(session, study.id, generation, bundle.name, bundle.version):
                return False
        started = time.monotonic()
        datasets = read_study(self.settings.spool_dir, study.instance_paths)
        report = self.model.triage(datasets, site=study.site_key)
        new = NewAnalysis(
            generation=generation,
            algorithm_name=bundle.name,
            algorithm_version=bundle.version,
            synthetic=bundle.is_synthetic,
            priority=report.priority,
            triggered_by=list(report.triggered_by),
            findings=finding_rows(report),
            ood=report.ood_dict(),
            duration_s=time.monotonic() - started,
            objects=[],
            destinations=[],
        )
        with self.catalog.sessions() as session:
            created = record_shadow_analysis(session, study_uid, new)
        if created:
            logger.info(
                "study %s generation %d scored in shadow by %s", study_uid, generation, bundle.ref
            )
        return created
