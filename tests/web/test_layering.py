"""The web talks to the job layer only: it never imports torch (nor the engine's torch side),
never a table or peewee, and writes no SQL."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB_MODULES = sorted((ROOT / "webapp").glob("*.py"))
TORCH_FREE_ENGINE = ("worker.engine.architectures", "worker.engine.config",
                     "worker.engine.documents", "worker.engine.errors", "worker.engine.files",
                     "worker.engine.memory", "worker.engine.option_types",
                     "worker.engine.sweep")
"""The engine modules the job layer may load into the web process: plain Python, no torch."""
FORBIDDEN_IMPORTS = ("worker.db", "peewee", "sqlite3", "playhouse", "torch", "worker.engine")
SQL = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|PRAGMA|"
                 r"CREATE\s+TABLE|json_extract)\b", re.IGNORECASE | re.DOTALL)


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names (with ``from a import b``: a.b)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
            out.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_IMPORTS)


@pytest.mark.parametrize("path", WEB_MODULES, ids=lambda p: p.name)
def test_web_module_imports_services_only(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [m for m in imported_modules(tree) if forbidden(m)]
    assert not bad, f"{path.name} imports {bad}: go through worker.jobs"
    sql = [node.value for node in ast.walk(tree)
           if isinstance(node, ast.Constant) and isinstance(node.value, str)
           and SQL.search(node.value)]
    assert not sql, f"{path.name} has SQL in {sql}: move the query behind worker.jobs"


def test_the_scan_catches_a_table_import_and_sql() -> None:
    tree = ast.parse("from worker.db import Training\nimport peewee\n"
                     "from worker import db\nq = 'SELECT step FROM metric'\n")
    assert [m for m in imported_modules(tree) if forbidden(m)] == \
        ["worker.db", "worker.db.Training", "peewee", "worker.db"]
    assert SQL.search("SELECT step FROM metric") and not SQL.search("Select a ready model")


def test_web_does_not_import_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import webapp
        app = webapp.create_app({{"TESTING": True, "DATA_DIR": {str(tmp_path)!r}}})
        c = app.test_client()
        for url in ("/", "/models", "/datasets", "/healthz", "/trainings/estimate"):
            assert c.get(url).status_code == 200, url
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                     or m.startswith("worker.engine.") and m not in {TORCH_FREE_ENGINE!r})
        assert "torch" not in sys.modules, bad
        print("ok", bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"
