from __future__ import annotations

from plugin.site import site_key


def test_site_key_joins_configured_tags_in_order() -> None:
    values = {"calling_ae_title": "ER_CR1", "InstitutionName": "  General   Hospital "}

    assert site_key(["calling_ae_title", "InstitutionName"], values) == "ER_CR1|General Hospital"


def test_missing_values_keep_their_position() -> None:
    values = {"calling_ae_title": "ER_CR1", "InstitutionName": None}

    assert site_key(["InstitutionName", "calling_ae_title"], values) == "|ER_CR1"
