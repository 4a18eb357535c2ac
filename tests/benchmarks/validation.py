"""Local validation on demo sites: report labels against ground truth, the gate, monitoring.

Run from the repository root with the project's virtualenv:

    .venv/bin/python tests/benchmarks/validation.py [--studies 400] [--stream 300] [--seed 0]

Every study is written by ``pacsclip demo studies`` (DICOM, generator reports, ground truth),
scored by the built-in demo model through the runtime the workers use, and recorded in a
catalog of its own with its report, which the report labeler labels; the figures come from
``pacsclip validate``'s and ``pacsclip monitor``'s own code. Synthetic phantoms only: nothing
here says anything clinical.

(a) At the demo site and at a site that acquires with the shifted profile (harsh tone curve,
    heavy noise, a coarse detector), the AUROC from report labels (with its 95% bootstrap
    interval) is set beside the AUROC from the generator's ground truth on the same studies: the
    truth must fall within the interval for every finding. The truth over every scored study is
    printed too: a report that does not mention a finding leaves its study out of that
    finding's validation, which is a selection of its own.
(b) The gate. At the shifted site, a child of the live model fitted there (``model fit-head``:
    a linear probe on the image embeddings of the first ``--studies`` shifted studies, labeled by
    their reports) runs in shadow on the next ``--studies`` studies of that site; it must be
    shown better than the live parent there (the paired interval of the AUROC difference above
    zero for at least one finding). The gate's decision on it is printed with its reasons: it
    goes live only if every finding also clears the AUROC floor at that site. At the demo site,
    a twin (the same weights under another version) must go live, and a candidate whose prompts
    are shuffled between findings must be refused as worse.
(c) Monitoring: ``--stream`` studies of the demo site, then studies of the same patients
    acquired with the shifted profile (harsh tone curve, heavy noise, a coarse detector); the
    window (the last 100 labeled studies) is recomputed every 25 labeled studies, and the
    alert must come within 200 labeled studies of the shift.
Exits 1 when (a), (b) or (c) fails.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Analysis, Site, Study
from plugin.catalog.report_labels import scored_labeled_studies, study_labels
from plugin.demo.evaluation import auroc_columns
from plugin.demo.studies import write_demo_studies
from plugin.inference import TriageModel
from plugin.models.bundle import Bundle, load_bundle
from plugin.models.registry import builtin_bundle_dirs
from plugin.validation.golive import golive_decision
from plugin.validation.intake import ReportIntake
from plugin.validation.monitoring import MonitorStore, Window, window_figures
from plugin.validation.report_labeler import ReportLabeler
from plugin.validation.site_validation import validate
from plugin.validation.statistics import Floors
from plugin.validation.vocabulary import default_vocabulary

FLOORS = Floors()
START = datetime(2026, 11, 1, tzinfo=UTC)


def demo_studies(
    out: Path, count: int, seed: int, shift: str | None = None
) -> list[dict[str, Any]]:
    write_demo_studies(out, count=count, seed=seed, shift=shift)
    with (out / "reports.csv").open() as handle:
        reports = {r["study_uid"]: r["text"] for r in csv.DictReader(handle)}
    with (out / "truth.csv").open() as handle:
        truth = list(csv.DictReader(handle))
    return [
        {
            "uid": row["study_uid"],
            "file": next((out / "studies" / row["study_uid"]).glob("*.dcm")),
            "text": reports[row["study_uid"]],
            "truth": {
                k: int(v) for k, v in row.items() if k not in ("study_uid", "accession", "site")
            },
        }
        for row in truth
    ]


def score(model: TriageModel, studies: list[dict[str, Any]]) -> None:
    for study in studies:
        report = model.triage([dcmread(study["file"])], site="demo")
        key = f"{model.bundle.name}@{model.bundle.version}"
        study.setdefault("scores", {})[key] = (
            report.priority,
            [{"name": f.name, "probability": f.probability, "threshold": f.threshold}
             for f in report.findings],
        )  # fmt: skip


def record(
    catalog: Catalog,
    intake: ReportIntake,
    studies: list[dict[str, Any]],
    live: str,
    first_hour: int = 0,
    site_key: str = "demo",
) -> None:
    with catalog.sessions.begin() as session:
        site = session.query(Site).filter_by(key=site_key).one_or_none() or Site(key=site_key)
        for i, study in enumerate(studies):
            row = Study(
                study_instance_uid=study["uid"],
                site=site,
                state="analysed",
                calling_ae_title="DEMO",
                received_at=START + timedelta(hours=first_hour + i),
            )
            session.add(row)
            session.flush()
            for model, (priority, findings) in study["scores"].items():
                name, version = model.split("@")
                session.add(
                    Analysis(
                        study_id=row.id, generation=1, algorithm_name=name,
                        algorithm_version=version, synthetic=True, priority=priority,
                        triggered_by=[], findings=findings,
                        role="live" if model == live else "shadow",
                    )
                )  # fmt: skip
    for study in studies:
        intake.add(study["text"], source="csv", study_uid=study["uid"], label=False)
    intake.label_missing()


def shuffled_copy(bundle: Bundle, dest: Path, version: str) -> Bundle:
    """The bundle under another version, with each finding's prompt embeddings moved to the
    next finding: a plausible-looking candidate that is worse at everything."""
    import json

    from plugin.models.bundle import sha256_file

    shutil.copytree(bundle.directory, dest)
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["version"] = version
    path = dest / manifest["files"]["prompt_embeddings"]["path"]
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    names = [f["name"] for f in manifest["findings"]]
    rolled = {}
    for key, value in arrays.items():
        moved = next((n for n in names if key.startswith(n)), None)
        if moved is None:
            rolled[key] = value
            continue
        source = names[(names.index(moved) + 1) % len(names)]
        rolled[key] = arrays[key.replace(moved, source, 1)]
    np.savez(path, **rolled)
    manifest["files"]["prompt_embeddings"]["sha256"] = sha256_file(path)
    (dest / "bundle.json").write_text(json.dumps(manifest))
    return load_bundle(dest)


def site_child(
    demo: Bundle, trained_on: list[dict[str, Any]], labeler: ReportLabeler, tmp: Path
) -> Bundle:
    """``pacsclip model fit-head``'s child of ``demo``, fitted on the studies' images with the
    labels of their reports; a finding the report leaves unmentioned or uncertain counts as
    absent (CheXpert's U-zeros), since a head needs every finding labeled."""
    from plugin.bundle_tuning import fit_head
    from plugin.bundle_versions import write_new_version

    labels_csv = tmp / "child-labels.csv"
    names = [f.name for f in demo.findings]
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *names])
        for study in trained_on:
            said = labeler.label(study["text"]).as_json()
            writer.writerow([study["file"], *(int(said.get(n) == "present") for n in names)])
    child, _ = write_new_version(
        demo,
        tmp / "child",
        f"{demo.version}+site-fit",
        lambda directory: fit_head(directory, labels_csv, kind="linear_probe", threads=2).change,
    )
    return child


def truth_auroc(studies: list[dict[str, Any]], live: str, name: str) -> float:
    probs = [
        next(x["probability"] for x in s["scores"][live][1] if x["name"] == name) for s in studies
    ]
    truth = [s["truth"][name] for s in studies]
    return float(auroc_columns(np.array(probs)[:, None], np.array(truth)[:, None])[0])


def part_a(
    studies: list[dict[str, Any]],
    answer: dict[str, Any],
    live: str,
    site_key: str,
    labeler: ReportLabeler,
) -> bool:
    """The report-label AUROC's interval must hold the truth AUROC of the same studies (the
    labels' own error); the truth over all scored studies is printed beside it, since reports
    that leave a finding unmentioned take their studies out of its validation."""
    print(f"(a) report labels vs ground truth, site {site_key}")
    print(
        f"    {'finding':<18} {'labeled':>7} {'AUROC: report labels [95% CI]':>30}"
        f" {'truth, same studies':>20} {'truth, all scored':>18}"
    )
    site = next(s for s in answer["sites"] if s["site"] == site_key)
    model = next(m for m in site["models"] if m["model"] == live)
    scored = [s for s in studies if s["scores"][live][0] != "not_scored"]
    labels = {s["uid"]: labeler.label(s["text"]).as_json() for s in scored}
    ok = True
    for name, f in model["findings"].items():
        if not f["enough"]:
            print(f"    {name:<18} too few labels: {f['missing']}")
            ok = False
            continue
        same = [s for s in scored if labels[s["uid"]].get(name) in ("present", "absent")]
        same_auroc, all_auroc = truth_auroc(same, live, name), truth_auroc(scored, live, name)
        low, high = f["auroc_ci95"]
        inside = low <= same_auroc <= high
        ok &= inside
        print(
            f"    {name:<18} {f['positives'] + f['negatives']:>7} "
            f"{f['auroc']:>9.3f} [{low:.3f}, {high:.3f}]{'':>5} {same_auroc:>12.3f}"
            f"  {'within' if inside else 'OUTSIDE'} {all_auroc:>12.3f}"
        )  # fmt: skip
    return ok


def gate_child(answer: dict[str, Any], child: Bundle) -> bool:
    """The child in shadow at the shifted site: shown better than the live parent there on at
    least one finding; the gate's decision on it is printed with its reasons."""
    site = next(s for s in answer["sites"] if s["site"] == "shifted")
    model = next(m for m in site["models"] if m["model"] == child.ref)
    print(f"    {child.ref} in shadow at the shifted site, {model['studies']} studies:")
    print(f"    {'finding':<18} {'child AUROC':>11} {'live AUROC':>10}  child - live [95% CI]")
    better = []
    for name, versus in sorted(model["versus_live"].items()):
        if not versus.get("enough"):
            print(f"    {name:<18} too few labels beside the live model")
            continue
        low, high = versus["ci95"]
        auroc = model["findings"][name]["auroc"]
        # On the same studies: the paired difference is taken where both scored.
        before = auroc - versus["auroc_difference"]
        print(
            f"    {name:<18} {auroc:>11.3f} {before:>10.3f}  "
            f"{versus['auroc_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
            f"{'  better' if low > 0 else ''}"
        )
        if low > 0:
            better.append(name)
    decision = golive_decision(
        answer,
        child.ref,
        floors=FLOORS,
        has_ood_reference=child.manifest.ood is not None,
    )
    print(
        f"    better than live on {', '.join(better) or 'no finding'}; gate: "
        f"{'allowed' if decision.allowed else 'refused'}"
    )
    for line in decision.reasons[:3]:
        print(f"      - {line}")
    return bool(better)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--stream", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    demo = load_bundle(builtin_bundle_dirs()[0])
    labeler = ReportLabeler(default_vocabulary())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        same = load_bundle(demo.directory)
        twin_dir = tmp / "twin"
        shutil.copytree(demo.directory, twin_dir)
        import json

        manifest = json.loads((twin_dir / "bundle.json").read_text())
        manifest["version"] = "twin"
        (twin_dir / "bundle.json").write_text(json.dumps(manifest))
        twin = load_bundle(twin_dir)
        worse = shuffled_copy(same, tmp / "worse", "shuffled")
        models = [TriageModel(b, threads=2) for b in (demo, twin, worse)]
        live = demo.ref

        studies = demo_studies(tmp / "site", args.studies, args.seed)
        shifted = demo_studies(tmp / "site-shifted", args.studies, args.seed, "demo-shifted")
        for model in models:
            score(model, studies)
        score(models[0], shifted)
        catalog = open_catalog(f"sqlite:///{tmp / 'catalog.sqlite3'}")
        intake = ReportIntake(catalog.sessions, lambda: labeler)
        record(catalog, intake, studies, live)
        record(catalog, intake, shifted, live, site_key="shifted")
        answer = validate(catalog.sessions, labeler.version, live_model=live, floors=FLOORS)
        ok_a = part_a(studies, answer, live, "demo", labeler)
        ok_a &= part_a(shifted, answer, live, "shifted", labeler)

        print("\n(b) the go-live gate")
        child = site_child(demo, shifted, labeler, tmp)
        later = demo_studies(
            tmp / "site-shifted-later", args.studies, args.seed + 3, "demo-shifted"
        )
        score(models[0], later)
        score(TriageModel(child, threads=2), later)
        record(catalog, intake, later, live, first_hour=len(shifted), site_key="shifted")
        answer = validate(catalog.sessions, labeler.version, live_model=live, floors=FLOORS)
        ok_b = gate_child(answer, child)
        print("    at the demo site:")
        for candidate, expect in ((twin.ref, True), (worse.ref, False)):
            decision = golive_decision(answer, candidate, floors=FLOORS, has_ood_reference=True)
            ok_b &= decision.allowed == expect
            print(f"    {candidate}: {'allowed' if decision.allowed else 'refused'}")
            for line in decision.reasons[:3]:
                print(f"      - {line}")

        print("\n(c) monitoring through a shift in acquisition")
        before = demo_studies(tmp / "stream", args.stream, args.seed + 1)
        after = demo_studies(tmp / "shifted", args.stream, args.seed + 2, shift="demo-shifted")
        stream_catalog = open_catalog(f"sqlite:///{tmp / 'stream.sqlite3'}")
        stream_intake = ReportIntake(stream_catalog.sessions, lambda: labeler)
        store = MonitorStore(tmp / "monitoring")
        window = Window(studies=100, days=365)
        alert_after = None
        fed = 0
        for part in (before, after):
            score(models[0], part)
        sequence = before + after
        for start in range(0, len(sequence), 25):
            chunk = sequence[start : start + 25]
            record(stream_catalog, stream_intake, chunk, live, first_hour=start)
            fed += len(chunk)
            with stream_catalog.sessions() as session:
                rows = scored_labeled_studies(session, labeler.version, site=None, since=None)
                labels = study_labels(session, [r.study_id for r in rows], labeler.version)
            now = START + timedelta(hours=fed)
            figures = window_figures(rows, labels, window=window, floors=FLOORS, now=now)
            alerts = [a for a in store.record(figures, now) if a.started]
            if alerts and alert_after is None and fed > len(before):
                alert_after = fed - len(before)
                for alert in alerts:
                    print(f"    after {alert_after} shifted studies: {alert.message()}")
            elif alerts and fed <= len(before):
                print(f"    false alarm before the shift, at {fed}: {alerts[0].message()}")
        labeled_after = None
        if alert_after is not None:
            with stream_catalog.sessions() as session:
                rows = scored_labeled_studies(session, labeler.version, site=None, since=None)
            shifted_uids = {s["uid"] for s in after[:alert_after]}
            labeled_after = len({r.study_id for r in rows if r.study_instance_uid in shifted_uids})
        ok_c = alert_after is not None and (labeled_after or 0) <= 200
        print(
            f"    alert after {alert_after} shifted studies ({labeled_after} of them labeled and"
            f" scored); required within 200 labeled studies: {'met' if ok_c else 'NOT met'}"
        )
    print(f"\n{time.monotonic() - started:.0f} s; (a) {'met' if ok_a else 'NOT met'}, "
          f"(b) {'met' if ok_b else 'NOT met'}, (c) {'met' if ok_c else 'NOT met'}")  # fmt: skip
    return 0 if ok_a and ok_b and ok_c else 1


if __name__ == "__main__":
    sys.exit(main())
