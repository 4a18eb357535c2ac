"""The worklist HTTP API (FastAPI): studies, AI results, health and Prometheus metrics."""

from plugin.api.app import create_app

__all__ = ["create_app"]
