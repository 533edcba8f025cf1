"""The Huey queue: importing the tasks writes nothing; the queue file appears in the data folder
chosen when the queue is first used (a fresh interpreter, as the web and the worker start)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_queue_file_is_made_on_first_use_in_the_data_folder_chosen_then(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os
        from pathlib import Path

        import worker.tasks
        from worker.queue import huey

        assert sorted(os.listdir(".")) == [], os.listdir(".")  # nothing written at import
        os.environ["SAE_STUDIO_DATA"] = str(Path("chosen-later").resolve())
        worker.tasks.prepare_model(7)  # enqueued, not run: no consumer here
        assert huey.pending_count() == 1
        print(sorted(p.name for p in Path("chosen-later").iterdir()))
    """)
    env = dict(os.environ, SAE_STUDIO_DATA=str(tmp_path / "at-import"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "queue.db" in out.stdout, out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen-later"]
