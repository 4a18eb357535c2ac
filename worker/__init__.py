"""Celery worker process: task definitions that call into ``plugin``."""
