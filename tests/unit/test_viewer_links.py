"""Links into the site's viewer: OHIF's path after a configured base by default, a full
template as it is, none when unconfigured; a template may name the study only."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from plugin.errors import ConfigError
from plugin.settings import Settings
from plugin.viewer_links import OHIF_TEMPLATE, check_template, viewer_link

UID = "1.2.826.0.1.3680043.8.498.1"


def test_the_default_is_ohifs_viewer_path_after_the_base() -> None:
    assert OHIF_TEMPLATE == "/viewer?StudyInstanceUIDs={study_uid}"
    assert (
        viewer_link(OHIF_TEMPLATE, "https://pacs.example.org/ohif/", UID)
        == f"https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={UID}"
    )
    assert viewer_link(OHIF_TEMPLATE, "/", UID) == f"/viewer?StudyInstanceUIDs={UID}"
    assert viewer_link(OHIF_TEMPLATE, None, UID) is None  # where the viewer is is not known


def test_a_full_template_is_used_as_it_is_and_an_empty_one_turns_links_off() -> None:
    weasis = "https://viewer.example.org/view?studyUID={study_uid}&archive=main"
    assert (
        viewer_link(weasis, "https://ignored.example", UID)
        == f"https://viewer.example.org/view?studyUID={UID}&archive=main"
    )
    assert viewer_link("", "https://pacs.example.org", UID) is None
    assert viewer_link(OHIF_TEMPLATE, "https://x.example", "1.2&3") == (
        "https://x.example/viewer?StudyInstanceUIDs=1.2%263"  # never breaks out of its value
    )


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("/viewer?patient={patient_id}", "may only use {study_uid}"),
        ("/viewer?uid={}", "may only use {study_uid}"),
        ("/viewer?uid={study_uid", "viewer_url_template"),
        ("javascript:alert({study_uid})", "must start with /"),
        ("viewer?uid={study_uid}", "must start with /"),
    ],
)
def test_a_template_that_could_leak_or_inject_is_refused(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("{", r"\{").replace("?", r"\?")):
        check_template(template)


def test_settings_carry_the_viewer_and_refuse_bad_ones(
    make_settings: Callable[..., Settings],
) -> None:
    default = make_settings()
    assert default.viewer_url_template == OHIF_TEMPLATE and default.viewer_base_url is None
    site = make_settings(viewer_base_url="https://pacs.example.org/ohif")
    assert site.viewer_base_url == "https://pacs.example.org/ohif"
    with pytest.raises(ConfigError, match="may only use"):
        make_settings(viewer_url_template="/viewer?PatientID={patient_id}")
    with pytest.raises(ConfigError, match="viewer_base_url"):
        make_settings(viewer_base_url="ftp://pacs.example.org")
