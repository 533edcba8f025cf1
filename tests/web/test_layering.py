"""The web never imports torch (nor the engine): it talks to the worker through the DB."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_web_does_not_import_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import webapp
        app = webapp.create_app({{"TESTING": True, "DATA_DIR": {str(tmp_path)!r}}})
        c = app.test_client()
        for url in ("/", "/models", "/datasets", "/healthz", "/trainings/estimate"):
            assert c.get(url).status_code == 200, url
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                     or m.startswith("worker.engine.") and m not in (
                         "worker.engine.config", "worker.engine.errors",
                         "worker.engine.memory"))
        assert "torch" not in sys.modules, bad
        print("ok", bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"
