"""tests/tools/relayout.py on a synthetic tree as it looks after a branch begun before the split is merged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "tools"))

import relayout  # noqa: E402

AFTER_MERGE = {
    # Already moved by the split; another branch's edit added a relative import of a module now elsewhere.
    "hooks/__init__.py": "",
    "hooks/api/__init__.py": "DEFAULT_SOCKET = 'x'\n",
    "hooks/api/errors.py": "class NewError(Exception): ...\n",
    "hooks/api/client.py": "from . import DEFAULT_SOCKET\n",
    "hooks/api/procfs.py": "",
    "hooks/hookd/__init__.py": "",
    "hooks/hookd/manager.py": "from .errors import NewError  # noqa: F401\n\n\nclass GpuManager: ...\n",
    # A module that branch added at the old place.
    "hooks/reconcile.py": ("from . import procfs\nfrom .errors import (\n    NewError,\n)\n"
                           "from .manager import GpuManager\n"),
    "tests/unit/test_reconcile.py": (
        "from kybernate.hooks.reconcile import GpuManager\n"
        "CMD = 'python -m kybernate.hooks.daemon; from kybernate.hooks import logs, cuda'\n"),
}


def test_moves_and_rewrites_then_has_nothing_left_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in AFTER_MERGE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    assert relayout.main(["--root", str(tmp_path)]) == 0

    assert not (tmp_path / "hooks/reconcile.py").exists()
    assert (tmp_path / "hooks/hookd/reconcile.py").read_text() == (
        "from kybernate.hooks.api import procfs\nfrom kybernate.hooks.api.errors import NewError\n"
        "from .manager import GpuManager\n")
    assert (tmp_path / "hooks/hookd/manager.py").read_text().startswith(
        "from kybernate.hooks.api.errors import NewError  # noqa: F401\n")
    assert (tmp_path / "hooks/api/client.py").read_text() == "from . import DEFAULT_SOCKET\n"  # a name, not a module
    assert (tmp_path / "tests/unit/test_reconcile.py").read_text() == (
        "from kybernate.hooks.hookd.reconcile import GpuManager\n"
        "CMD = 'python -m kybernate.hooks.hookd.daemon; "
        "from kybernate.hooks.api import logs; from kybernate.hooks.gpu import cuda'\n")
    capsys.readouterr()

    assert relayout.main(["--root", str(tmp_path), "--check"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to do"
