"""docs/architecture.md's import directions hold for the tree, and the check catches a broken one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "tools"))

import import_rules  # noqa: E402


def test_the_tree_follows_the_import_directions() -> None:
    assert import_rules.violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    # The shim reaches into the daemon (a lazy import counts too).
    ({"shim/service.py": "def f():\n    from kybernate.hooks.hookd import manager\n"},
     "shim/service.py:2: kybernate.shim.service imports kybernate.hooks.hookd "),
    # The API part imports driver access, by a relative import.
    ({"hooks/api/client.py": "from ..gpu import cuda\n"},
     "hooks/api/client.py:1: kybernate.hooks.api.client imports kybernate.hooks.gpu "),
    # ttrpc imports the shim above it.
    ({"shim/ttrpc/server.py": "from .. import manager\n"},
     "shim/ttrpc/server.py:1: kybernate.shim.ttrpc.server imports kybernate.shim.manager"),
    # The start path loads a daemon-only library.
    ({"shim/manager.py": "import prometheus_client\n"},
     "shim/manager.py:1: kybernate.shim.manager imports prometheus_client"),
    # The installer imports Kybernate.
    ({"packaging/installer/install.py": "from kybernate.shim import cli\n"},
     "packaging/installer/install.py:1: installer.install imports kybernate.shim "),
])
def test_a_broken_rule_is_reported(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    found = import_rules.violations(_tree(tmp_path, files))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_allowed_directions_pass(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "shim/service.py": "from kybernate.hooks.api import client\nfrom .ttrpc import server\n",
        "hooks/hookd/manager.py": "from kybernate.hooks.gpu import cuda\nfrom ..api import model\n",
        "hooks/cli/main.py": "from kybernate.hooks.api import manifest\nimport grpc\n",
    })
    assert import_rules.violations(root) == []


def test_the_shims_start_path_loads_none_of_the_daemons_libraries() -> None:
    """What `start` imports before it forks (cli, manager, daemon) pays for every pod: no hookd, no
    manifest dataclasses, no metrics or installer libraries."""
    import subprocess

    code = ("import sys; import kybernate.shim.cli, kybernate.shim.manager, kybernate.shim.daemon; "
            "print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    unwanted = {"kybernate.hooks.api.model", "kybernate.hooks.api.client", "kybernate.hooks.hookd",
                "kybernate.hooks.gpu", "grpc", "prometheus_client", "packaging", "tomlkit", "pynvml"}
    assert not loaded & unwanted
