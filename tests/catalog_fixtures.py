"""Studies in the catalog as the node would catalog them, then analysed by the worker's own
code (the live model and every shadow model): for tests that need scored studies without a
running node."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import dcmread

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Instance, Series, Site, Study
from plugin.settings import Settings
from plugin.site import site_key
from worker.tasks import WorkerContext, score_without_live_model

CALLING_AE = "STORESCU"  # storescu's default calling AE title


def arrive(settings: Settings, studies: Path) -> WorkerContext:
    """The studies as the node catalogs them (spool file, rows, complete), then the worker's
    analysis: the live model, then every shadow model. Returns the worker's context."""

    catalog = open_catalog(settings.effective_database_url)
    uids = []
    with catalog.sessions.begin() as session:
        sites: dict[str, Site] = {}
        for path in sorted(studies.glob("*/*.dcm")):
            ds = dcmread(path)
            relative = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            (settings.spool_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, settings.spool_dir / relative)
            values = {"calling_ae_title": CALLING_AE, "InstitutionName": ds.InstitutionName}
            key = site_key(settings.site_tags, values)
            instance = Instance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                path=relative,
                size_bytes=path.stat().st_size,
                sha256="0" * 64,
                calling_ae_title=CALLING_AE,
            )
            series = Series(
                series_instance_uid=ds.SeriesInstanceUID,
                modality=ds.Modality,
                instances=[instance],
            )
            session.add(
                Study(
                    study_instance_uid=ds.StudyInstanceUID,
                    site=sites.setdefault(key, Site(key=key)),
                    state="complete",
                    calling_ae_title=CALLING_AE,
                    generation=1,
                    series=[series],
                )
            )
            uids.append(ds.StudyInstanceUID)
    context = WorkerContext(settings)
    for uid in uids:
        if context.live is None:
            score_without_live_model(context, uid, 1)
            continue
        context.analyser.analyse(uid, 1)
        context.score_in_shadow(uid, 1)
    return context
