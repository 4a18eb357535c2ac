"""Logging set-up shared by every entry point."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # pynetdicom logs DIMSE traffic at INFO; datasets never reach our log level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # faiss tries its AVX2 build first and logs the ImportError with a traceback at INFO
    # before falling back to the generic build, which is what runs here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # dicomweb-client logs study, series and SOP UIDs at INFO on every retrieve and request
    # URLs at DEBUG; the retrying library it uses warns about each failed try, which pacsclip
    # reports itself with its own classification.
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    logging.getLogger("retrying").setLevel(logging.ERROR)
