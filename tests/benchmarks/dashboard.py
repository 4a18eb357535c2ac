"""Worklist page time with 100,000 studies, against the JSON API's study list in the same run.

Run from the repository root with the project's virtualenv:

    .venv/bin/python tests/benchmarks/dashboard.py [--studies 100000] [--repeats 30]

Seeds a fresh SQLite catalog (migrated, with the worklist indexes) with ``--studies`` studies
over three sites, builds the API with the dashboard mounted, and times, in one process over the
ASGI interface (no network), alternating:
- the reference: ``GET /api/studies?limit=50`` (JSON, newest first);
- ``GET /`` (the worklist, 50 rows rendered as HTML), a filtered worklist
  (``?state=analysed&priority=stat``) and a page 1,000 pages deep (keyset cursor).
Prints median and p95 per request and each one's ratio to the reference's median.
Not a pytest test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

# Run as a script, this file's folder is on sys.path, not the repository root with tests.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from plugin.api import create_app  # noqa: E402
from plugin.catalog.db import open_catalog  # noqa: E402
from plugin.catalog.worklist import Cursor  # noqa: E402
from plugin.dashboard import mount_dashboard  # noqa: E402
from plugin.metrics import PacsclipMetrics  # noqa: E402
from plugin.settings import load_settings  # noqa: E402
from tests.unit.test_worklist_pagination import START, seed  # noqa: E402

TOKEN = "benchmark-token"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsclip-dashboard-bench-") as tmp:
        settings = load_settings(data_dir=Path(tmp), api_token=TOKEN)
        catalog = open_catalog(settings.effective_database_url)
        started = time.perf_counter()
        seed(catalog, args.studies)
        print(f"seeded {args.studies} studies in {time.perf_counter() - started:.1f} s")
        metrics = PacsclipMetrics()
        app = create_app(settings, catalog.sessions, metrics)
        mount_dashboard(app, settings, catalog.sessions, metrics)
        client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
        deep = Cursor(START + timedelta(seconds=args.studies // 4), args.studies // 2).token()
        requests = {
            "JSON API /api/studies?limit=50 (reference)": ("/api/studies", {"limit": "50"}),
            "worklist / (50 rows, HTML)": ("/", {}),
            "worklist, state + priority filter": (
                "/",
                {"state": "analysed", "priority": "stat"},
            ),
            "worklist, 1,000 pages deep": ("/", {"after": deep}),
        }
        times: dict[str, list[float]] = {name: [] for name in requests}
        for path, params in requests.values():  # warm: templates, statements, page cache
            assert client.get(path, params=params).status_code == 200
        for _ in range(args.repeats):
            for name, (path, params) in requests.items():
                begin = time.perf_counter()
                answer = client.get(path, params=params)
                times[name].append(time.perf_counter() - begin)
                if answer.status_code != 200:
                    raise SystemExit(f"{name}: HTTP {answer.status_code}")
        reference = statistics.median(next(iter(times.values())))
        print(f"\n{args.studies} studies, {args.repeats} repeats, medians and p95 in ms:")
        print("| request | median | p95 | x JSON API |\n|---|---|---|---|")
        for name, values in times.items():
            values.sort()
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            median = statistics.median(values)
            print(f"| {name} | {median * 1e3:.1f} | {p95 * 1e3:.1f} | {median / reference:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
