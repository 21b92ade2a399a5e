"""The import contracts `make lint` checks (pyproject.toml, [tool.importlinter]) catch the breaks they exist for.

`make lint` runs them over the real tree, which must keep them; this test plants one break of each kind in a copy
of the package and checks that lint-imports fails and names every one, so a contract cannot silently stop biting.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BREAKS = {
    # a file planted in the copy -> the import it makes, which a contract forbids
    "hyperrec/core/_planted_up.py": "import hyperrec.app.config",
    "hyperrec/training/_planted_faiss.py": "import faiss",
    "hyperrec/loadtest/_planted_grpc.py": "import grpc",
    "hyperrec/core/_planted_stub.py": "import hyperrec.v1.recommender_pb2",
    "hyperrec/server/_planted_redis.py": "import redis",
}


def test_lint_imports_reports_each_planted_break(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "hyperrec", tmp_path / "hyperrec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for path, line in BREAKS.items():
        (tmp_path / path).write_text(f"{line}  # noqa\n")
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    report = " ".join(done.stdout.split())  # lint-imports wraps long lines
    for path in BREAKS:
        module = path.removesuffix(".py").replace("/", ".")
        assert f"{module} ->" in report, f"{module} is not reported:\n{done.stdout[-3000:]}"
    assert "0 broken" not in report
