"""The per-container CRIU config file: named in config.json (org.criu.config) at Create, written when CRIU
will read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kybernate.shim import criu_config, runtime_options


def _bundle(tmp_path: Path, annotations: dict[str, str] | None = None) -> dict:
    spec: dict = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (tmp_path / "config.json").write_text(json.dumps(spec))
    os.chmod(tmp_path / "config.json", 0o640)
    return spec


def test_create_names_the_file_in_config_json_and_the_first_dump_writes_it(tmp_path: Path) -> None:
    spec = _bundle(tmp_path, {"io.kubernetes.cri.container-type": "container"})
    path = criu_config.name_in_spec(str(tmp_path), spec)
    assert path == str(tmp_path / criu_config.FILE_NAME)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["annotations"] == {"io.kubernetes.cri.container-type": "container", criu_config.ANNOTATION: path}
    assert written["process"] == {"args": ["sh"]}
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no file until a dump needs it
    assert criu_config.write_once(path, ("ghost-limit 16M",))
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    assert lines == ["link-remap", "ghost-limit 16M"]
    # A later dump keeps what is there (a restore's Create wrote its cgroup-root into it).
    assert not criu_config.write_once(path, ("tcp-close",))
    assert "tcp-close" not in Path(path).read_text()


def test_a_spec_without_annotations_gets_them(tmp_path: Path) -> None:
    spec = _bundle(tmp_path)
    path = criu_config.name_in_spec(str(tmp_path), spec)
    assert json.loads((tmp_path / "config.json").read_text())["annotations"] == {criu_config.ANNOTATION: path}


@pytest.mark.parametrize("users", ["/etc/my-criu.conf", ""])
def test_the_users_own_annotation_wins_and_nothing_is_written(tmp_path: Path, users: str) -> None:
    spec = _bundle(tmp_path, {criu_config.ANNOTATION: users})
    before = (tmp_path / "config.json").read_bytes()
    assert criu_config.name_in_spec(str(tmp_path), spec) is None
    assert (tmp_path / "config.json").read_bytes() == before
    assert not (tmp_path / criu_config.FILE_NAME).exists()


def test_defaults_are_not_repeated(tmp_path: Path) -> None:
    assert criu_config.render(("link-remap", "file-locks")).splitlines()[1:] == ["link-remap", "file-locks"]


@pytest.mark.parametrize("bad", ["", "link remap\nexec evil", "-x", "Link-Remap", "a\rb"])
def test_bad_options_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(criu_config.CriuConfigError, match="not a CRIU option"):
        criu_config.check_options([bad], "runtime.toml")


def test_runtime_toml_criu_options() -> None:
    config = runtime_options.from_toml('[kybernate]\ncriu_options = ["--ghost-limit 16M", "file-locks"]\n', "t")
    assert config.kybernate.criu_options == ("ghost-limit 16M", "file-locks")
    assert runtime_options.from_toml("", "t").kybernate.criu_options == ()


@pytest.mark.parametrize("value", ['"link-remap"', "[1]", '["bad option\\nx"]'])
def test_runtime_toml_bad_criu_options(value: str) -> None:
    with pytest.raises(runtime_options.OptionsError, match="criu_options"):
        runtime_options.from_toml(f"[kybernate]\ncriu_options = {value}\n", "t")


@pytest.mark.parametrize(("cgroups_path", "root"), [
    ("/kybgpu/kyb-store-r", "/kybgpu/kyb-store-r"),
    ("kubepods-besteffort-podabc.slice:cri-containerd:0123",
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/cri-containerd-0123.scope"),
    ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
    (":cri-containerd:abc", "/system.slice/cri-containerd-abc.scope"),
    ("-.slice:p:abc", "/p-abc.scope"),
    ("relative/path", None),
    ("/a/../escape", None),
    ("bad-.slice:p:n", None),
    ("", None),
])
def test_a_restore_names_the_new_containers_cgroup_as_criu_cgroup_root(cgroups_path: str, root: str | None) -> None:
    spec = {"linux": {"cgroupsPath": cgroups_path}} if cgroups_path else {}
    assert criu_config.restore_cgroup_root(spec) == root


def test_the_cgroup_root_is_written_for_a_restore_only(tmp_path) -> None:
    spec = {"linux": {"cgroupsPath": "/ns/new"}}
    path = str(tmp_path / criu_config.FILE_NAME)
    criu_config.write(path, (), criu_config.restore_cgroup_root(spec))
    assert "cgroup-root /ns/new\n" in open(path).read()
    os.unlink(path)
    assert criu_config.write_once(path)  # before a dump
    assert "cgroup-root" not in open(path).read()


def test_a_users_own_cgroup_root_option_wins() -> None:
    assert criu_config.render(["cgroup-root /mine"], "/ns/new").count("cgroup-root") == 1
