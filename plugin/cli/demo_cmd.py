"""``pacsclip demo studies``: synthetic DICOM studies and their reports, to try pacsclip with.

The writer (plugin.demo.studies, with pydicom and the report generator) is imported inside the
command; the site profiles (numpy only) name the choices in the help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from plugin.cli.common import JsonFlag, exit_on_error, print_json
from plugin.demo.sites import SHIFTED_SITE, SITES

demo_app = typer.Typer(
    no_args_is_help=True, help="Synthetic demo data (not patient data, not for clinical use)."
)

_SITES_HELP = ", ".join([f"{SITES[0].name} (default)", *(site.name for site in SITES[1:])])
_SHIFTS_HELP = SHIFTED_SITE.name


@demo_app.command("studies")
def demo_studies(
    out: Annotated[Path, typer.Option("--out", help="Folder to write into.")],
    count: Annotated[int, typer.Option("--count", help="Number of studies (1 to 100000).")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (0 to 9999999).")] = 0,
    site: Annotated[
        str | None,
        typer.Option("--site", help=f"Simulated site whose patients are imaged: {_SITES_HELP}."),
    ] = None,
    shift: Annotated[
        str | None,
        typer.Option(
            "--shift",
            help=(
                f"Acquire the site's patients with a shifted profile instead: {_SHIFTS_HELP} "
                "(same truth and reports, different pixels and InstitutionName)."
            ),
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write synthetic DICOM studies, their reports and truth (not for clinical use).

    DIR/studies/<StudyInstanceUID>/<SOPInstanceUID>.dcm: one radiograph per study
    DIR/reports.csv: study_uid,text (the generator's held-out phrasings)
    DIR/truth.csv: study_uid,accession,site and 1/0 per finding
    DIR/README.txt: how to send the studies and import the reports
    The same arguments write byte-identical files.
    """
    from plugin.demo.studies import write_demo_studies

    with exit_on_error(OSError):
        summary = write_demo_studies(out, count, seed, site, shift)
    if as_json:
        print_json(summary.as_dict())
        return
    shifted = f", shifted to {summary.shift}" if summary.shift else ""
    typer.echo(
        f"{summary.count} synthetic studies of site {summary.site}{shifted} "
        f"(InstitutionName {summary.institution}, seed {summary.seed}) in {summary.studies_dir}"
    )
    typer.echo(f"reports: {summary.reports_csv}; truth: {summary.truth_csv}")
    typer.echo(
        "send: TCP_NODELAY=1 /usr/bin/storescu +sd +r -aec PACSCLIP 127.0.0.1 11112 "
        f"{summary.studies_dir}/"
    )
    typer.echo(f"then: pacsclip report import {summary.reports_csv}")
