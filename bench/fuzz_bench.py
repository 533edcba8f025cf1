"""Fuzz every route of the app with N random requests (the cases of
tests/security/test_fuzz.py, more of them): no 5xx, JSON errors for JSON clients.

    .venv/bin/python bench/fuzz_bench.py 5000

Runs on a fresh temporary data folder; tasks are recorded, never run. Exits 1 at the first
failing case (hypothesis shrinks it and prints it), 0 when all N pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.security.test_fuzz import check, ensure_rows, requests  # noqa: E402
from webapp import create_app  # noqa: E402
from worker.jobs import common  # noqa: E402
from worker.queue import huey  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", type=int, nargs="?", default=3000, help="requests to send")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sae-fuzz-") as data:
        os.environ.update(SAE_STUDIO_DATA=data, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        common.open_database()
        huey.immediate = True
        queued: list[tuple[str, tuple[Any, ...]]] = []
        common.enqueue = lambda name, *task_args: queued.append((name, task_args))
        app = create_app({"TESTING": True, "DATA_DIR": data})
        client = app.test_client()
        ensure_rows()
        t0 = time.monotonic()

        @settings(max_examples=args.cases, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=requests(app))
        def run(case: Any) -> None:
            ensure_rows()
            check(client, case)

        run()
        print(f"{args.cases} cases, no 5xx ({time.monotonic() - t0:.0f} s; "
              f"{len(queued)} tasks queued, none run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
