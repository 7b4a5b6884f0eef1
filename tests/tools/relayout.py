"""Apply tests/tools/layout.json to a tree: move the files, rewrite imports and dotted names. Idempotent.

    python tests/tools/relayout.py [--root DIR] [--check]

For each old -> new module of the map whose old file still exists, the file is moved (`git mv` when git
tracks it). Then every .py file under shim/, hooks/, tests/, packaging/ gets its imports rewritten:
`from kybernate.hooks.client import X` and `from kybernate.hooks import client` name the new module;
a relative import that no longer resolves where the file now sits is resolved where it sat before the
move, mapped, and written relative when the target shares the file's package, absolute otherwise.
Dotted names and file paths in other text (strings, docs, pyproject.toml, Dockerfile) are rewritten too.
--check changes nothing and exits 1 when something would change (it prints what). Rewritten import
blocks may need re-sorting afterwards: `ruff check --select I --fix` on the files it names, then `make lint`.

It lives in tests/tools/ beside check_proto.py: development tools that read or rewrite the tree are not
shipped in any wheel or image, and tests/ is the one top-level folder that holds what only developers run.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_SUFFIXES = {".py", ".proto", ".md", ".toml", ".txt", ".sh", ".yaml", ".yml", ".service", ".cfg", ".ini"}
SCANNED = ("shim", "hooks", "proto", "tests", "packaging", "docs", "containerd-config")


class Layout:
    def __init__(self, data: dict[str, object]) -> None:
        self.roots: dict[str, str] = dict(data["roots"])  # type: ignore[call-overload]
        self.modules: dict[str, str] = dict(data["modules"])  # type: ignore[call-overload]
        self.reverse = {new: old for old, new in self.modules.items()}

    def path(self, module: str) -> Path | None:
        """The file of a module (relative to the tree), or None when it is outside the mapped roots."""
        for prefix, folder in self.roots.items():
            if module == prefix or module.startswith(prefix + "."):
                return Path(folder, *module[len(prefix):].lstrip(".").split(".")).with_suffix(".py") \
                    if module != prefix else Path(folder, "__init__.py")
        return None

    def module_of(self, path: Path) -> str | None:
        for prefix, folder in self.roots.items():
            try:
                rel = path.relative_to(folder)
            except ValueError:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts and parts[-1] == "__init__":
                parts.pop()
            return ".".join([prefix, *parts])
        return None

    def map(self, module: str) -> str:
        return self.modules.get(module, module)


def exists(root: Path, layout: Layout, module: str) -> bool:
    path = layout.path(module)
    if path is None:
        return False
    return (root / path).is_file() or (root / path.with_suffix("") / "__init__.py").is_file() \
        or (root / path.with_suffix("")).is_dir()


def move_files(root: Path, layout: Layout, check: bool) -> list[str]:
    done = []
    for old, new in layout.modules.items():
        src, dst = layout.path(old), layout.path(new)
        assert src is not None and dst is not None
        if not (root / src).is_file() or (root / dst).exists():
            continue
        done.append(f"move {src} -> {dst}")
        if check:
            continue
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        tracked = subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", str(src)],
                                 capture_output=True).returncode == 0
        if tracked:
            subprocess.run(["git", "-C", str(root), "mv", str(src), str(dst)], check=True)
        else:
            (root / src).rename(root / dst)
    return done


def _resolve(package: str, level: int, module: str | None) -> str:
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(base + ([module] if module else []))


def _render(indent: str, source: str, names: list[str], multiline: bool, comment: str) -> str:
    if multiline and len(names) > 1:
        body = "".join(f"{indent}    {n},\n" for n in names)
        return f"{indent}from {source} import ({comment}\n{body}{indent})\n"
    return f"{indent}from {source} import {', '.join(names)}{comment}\n"


def rewrite_imports(root: Path, layout: Layout, path: Path, text: str) -> str:
    """Rewrite `from X import ...` statements whose target moved; other text is left as it is."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    here = layout.module_of(path.relative_to(root))
    is_package = path.name == "__init__.py"
    here_pkg = (here if is_package else here.rpartition(".")[0]) if here else ""
    old_here = layout.reverse.get(here, here) if here else ""
    old_pkg = (old_here if is_package else old_here.rpartition(".")[0]) if old_here else ""
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.end_lineno is None:
            continue
        if node.level and not here:
            continue
        groups: dict[str, list[str]] = {}
        for alias in node.names:
            if node.level:
                # Where the file sits now, or else where it sat before the move.
                target = _resolve(here_pkg, node.level, node.module)
                probe = target if node.module else f"{target}.{alias.name}"
                if not exists(root, layout, probe) and old_pkg:
                    # Only a module the map moved: `from . import NAME` may import a plain name.
                    old_target = _resolve(old_pkg, node.level, node.module)
                    old_probe = old_target if node.module else f"{old_target}.{alias.name}"
                    if old_probe in layout.modules:
                        target = old_target
            else:
                assert node.module is not None
                target = node.module
            sub = f"{target}.{alias.name}"
            asname = f" as {alias.asname}" if alias.asname else ""
            if sub in layout.modules:  # `from kybernate.hooks import client`: the imported name is the module
                new_package, _, new_name = layout.map(sub).rpartition(".")
                shown = new_name + asname if new_name == alias.name else f"{new_name} as {alias.asname or alias.name}"
                groups.setdefault(new_package, []).append(shown)
            else:
                groups.setdefault(layout.map(target), []).append(alias.name + asname)
        sources = {}
        for module in groups:
            if not node.level:
                sources[module] = module
            elif module == here_pkg:
                sources[module] = "."
            elif module.startswith(here_pkg + "."):
                sources[module] = "." + module[len(here_pkg) + 1:]
            else:
                sources[module] = module
        if node.level:
            unchanged = [("." * node.level) + (node.module or "")]
        else:
            unchanged = [node.module or ""]
        if list(sources.values()) == unchanged:
            continue
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        comment = "  " + last[last.index("#"):].rstrip("\n") if "#" in last else ""
        multiline = node.end_lineno > node.lineno
        new = "".join(_render(indent, sources[m], names, multiline, comment) for m, names in groups.items())
        edits.append((node.lineno - 1, node.end_lineno, new))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = [new]
    return "".join(lines)


def _from_package(layout: Layout, match: re.Match[str]) -> str:
    """`from kybernate.hooks import logs, nvml` inside a string (code run by `python -c`)."""
    package, names = match.group(1), [n.strip() for n in match.group(2).split(",")]
    groups: dict[str, list[str]] = {}
    for name in names:
        new_package, _, new_name = layout.map(f"{package}.{name}").rpartition(".")
        groups.setdefault(new_package, []).append(new_name)
    return "; ".join(f"from {p} import {', '.join(n)}" for p, n in groups.items())


def rewrite_names(layout: Layout, text: str) -> str:
    """Dotted module names and file paths in any text (strings, docs, configuration)."""
    for package in sorted({old.rpartition(".")[0] for old in layout.modules}):
        text = re.sub(rf"from ({re.escape(package)}) import (\w+(?:, \w+)*)(?![\w.])",
                      lambda m: _from_package(layout, m), text)
    for old, new in sorted(layout.modules.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", new, text)
        old_path, new_path = layout.path(old), layout.path(new)
        if old_path is not None and new_path is not None:
            text = re.sub(rf"(?<![\w/.]){re.escape(old_path.as_posix())}(?![\w])", new_path.as_posix(), text)
    return text


def files(root: Path) -> list[Path]:
    out = []
    for top in ("pyproject.toml", "Makefile", "README.md"):
        if (root / top).is_file():
            out.append(root / top)
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Dockerfile") \
                    and "_pb2" not in path.name and path.resolve() != (HERE / "layout.json").resolve():
                out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=HERE.parents[1])
    parser.add_argument("--map", type=Path, default=HERE / "layout.json")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    layout = Layout(json.loads(args.map.read_text()))
    changes = move_files(root, layout, args.check)
    for path in files(root):
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        new = rewrite_imports(root, layout, path, text) if path.suffix == ".py" else text
        new = rewrite_names(layout, new)
        if new != text:
            changes.append(f"rewrite {path.relative_to(root)}")
            if not args.check:
                path.write_text(new, encoding="utf-8", errors="surrogateescape")
    print("\n".join(changes) if changes else "nothing to do")
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
