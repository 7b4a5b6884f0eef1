"""Check the allowed import directions of docs/architecture.md over a source tree. Exit 1 on a violation.

    python tests/tools/import_rules.py [ROOT]

Every import in every .py file under shim/, hooks/ and packaging/installer/ (function-level imports too)
is resolved to a full module name and checked against RULES: the first rule whose package contains the
importing module says which of our packages it may import, and which third-party packages it may not.
A small AST walk rather than import-linter: nine rules, no extra tool to install, and it sees lazy imports.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# Folder -> the module name of its files (the PEP 420 namespace of pyproject.toml).
ROOTS = {"shim": "kybernate.shim", "hooks": "kybernate.hooks", "packaging/installer": "installer"}
OURS = ("kybernate",)
# Third-party packages that only hookd's metrics and the installer use: the shim's start path and the API
# part never load them.
DAEMON_AND_INSTALLER_ONLY = ("prometheus_client", "packaging", "tomlkit", "pynvml")
# The `kybernate` command's terminal progress bars: nothing else loads them.
CLI_ONLY = ("tqdm",)


@dataclass(frozen=True)
class Rule:
    package: str  # the importing modules: this package and everything below it
    may_import: tuple[str, ...]  # our packages it may import (each with everything below it)
    may_not_import: tuple[str, ...] = ()  # third-party packages it must not import
    why: str = ""


RULES = (
    Rule("kybernate.shim.ttrpc", ("kybernate.shim.ttrpc", "kybernate.api"), DAEMON_AND_INSTALLER_ONLY + CLI_ONLY,
         "ttrpc is a transport: it knows nothing of the shim above it"),
    Rule("kybernate.shim", ("kybernate.shim", "kybernate.hooks.api", "kybernate.api"),
         DAEMON_AND_INSTALLER_ONLY + CLI_ONLY,
         "the shim depends only on hookd's API part"),
    # The one exception: status codes are the wire's (google.rpc.Code, shared by ttrpc and gRPC), defined once
    # in the transport as a standard-library enum; the API's errors carry them.
    Rule("kybernate.hooks.api", ("kybernate.hooks.api", "kybernate.api", "kybernate.shim.ttrpc.codes"),
         DAEMON_AND_INSTALLER_ONLY + CLI_ONLY,
         "the API part is imported by the shim, hookd and the CLI: it imports nothing else of ours but the codes"),
    Rule("kybernate.hooks.gpu", ("kybernate.hooks.gpu", "kybernate.hooks.api", "kybernate.api"), CLI_ONLY,
         "driver access serves the daemon and knows nothing of it"),
    # containerd's gRPC API, and our shim's ttrpc socket for a checkpoint straight into the store (the transport
    # and the shim's socket naming, shim.manager, nothing else of the shim): used by hookd and the CLI.
    Rule("kybernate.hooks.containerd", ("kybernate.hooks.containerd", "kybernate.hooks.api", "kybernate.api",
                                        "kybernate.shim.ttrpc", "kybernate.shim.manager"),
         ("prometheus_client", "pynvml", *CLI_ONLY), "a client of containerd and of our shim's socket, nothing more"),
    Rule("kybernate.hooks.hookd", ("kybernate.hooks.hookd", "kybernate.hooks.gpu", "kybernate.hooks.api",
                                   "kybernate.hooks.containerd", "kybernate.api"), CLI_ONLY,
         "the daemon sits on top of driver access, the API and the containerd client"),
    # A store checkpoint is hookd's (its Store RPC): the CLI needs nothing of the shim.
    Rule("kybernate.hooks.cli", ("kybernate.hooks.cli", "kybernate.hooks.api", "kybernate.api",
                                 "kybernate.hooks.containerd"),
         ("prometheus_client", "pynvml"), "the command-line tool talks to containerd, never to the daemon's insides"),
    Rule("kybernate.hooks", ("kybernate.hooks",), DAEMON_AND_INSTALLER_ONLY, "the package itself holds nothing"),
    Rule("installer", (), (), "the installer runs before Kybernate is installed: it imports none of it"),
)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(root: Path, path: Path) -> str | None:
    for folder, package in ROOTS.items():
        try:
            rel = path.relative_to(root / folder)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join([package, *parts])
    return None


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, full module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from package import module` imports the module.
            found += [(node.lineno, source)] if node.module else [(node.lineno, f"{source}.{a.name}")
                                                                  for a in node.names]
    return found


def violations(root: Path) -> list[str]:
    out = []
    for folder in ROOTS:
        for path in sorted((root / folder).rglob("*.py")):
            module = module_name(root, path)
            if module is None:
                continue
            rule = next((r for r in RULES if _within(module, r.package)), None)
            if rule is None:
                continue
            for line, name in imports(path, module):
                top = name.split(".")[0]
                if top in OURS and not any(_within(name, allowed) for allowed in rule.may_import):
                    out.append(f"{path.relative_to(root)}:{line}: {module} imports {name} ({rule.why})")
                elif top in rule.may_not_import:
                    out.append(f"{path.relative_to(root)}:{line}: {module} imports {top} ({rule.why})")
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2]
    found = violations(root)
    print("\n".join(found) if found else "import directions: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
