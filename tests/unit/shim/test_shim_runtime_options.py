import pytest
from google.protobuf import any_pb2

from kybernate.api import runc_options_pb2, runtimeoptions_pb2
from kybernate.shim import runtime_options
from kybernate.shim.runtime_options import KybernateOptions, OptionsError


def _cri_any(**fields):
    cri = runtimeoptions_pb2.Options(**fields)
    return any_pb2.Any(type_url="runtimeoptions.v1.Options", value=cri.SerializeToString())


def test_no_options_means_runc_defaults_and_kybernate_defaults():
    config = runtime_options.from_any_bytes(b"")
    assert config.runc is None
    assert config.runc_any_bytes() == b""
    assert config.kybernate == KybernateOptions()


def test_cri_config_body_becomes_runc_options_and_kybernate_settings():
    body = b'BinaryName = "/usr/sbin/runc"\nRoot = "/run/r"\nSystemdCgroup = true\n' \
           b'[kybernate]\nlock_timeout_ms = 2500\npause_releases_vram = false\nhookd_timeout_s = 30\n'
    config = runtime_options.from_any(_cri_any(config_body=body))
    assert config.runc == runc_options_pb2.Options(binary_name="/usr/sbin/runc", root="/run/r", systemd_cgroup=True)
    assert config.kybernate == KybernateOptions(lock_timeout_ms=2500, pause_releases_vram=False, hookd_timeout_s=30.0)
    handed_on = any_pb2.Any.FromString(config.runc_any_bytes())
    assert handed_on.type_url == "containerd.runc.v1.Options"
    assert runc_options_pb2.Options.FromString(handed_on.value).root == "/run/r"


def test_cri_config_path_is_read(tmp_path):
    path = tmp_path / "runtime.toml"
    path.write_text('Root = "/run/x"\n[kybernate]\nhookd_socket = "/tmp/h.sock"\n')
    config = runtime_options.from_any(_cri_any(config_path=str(path)))
    assert config.runc.root == "/run/x"
    assert config.kybernate.hookd_socket == "/tmp/h.sock"


def test_containerd2_whole_table_body_keeps_only_known_keys():
    config = runtime_options.from_any(_cri_any(config_body=b'TypeUrl = ""\nConfigPath = ""\nRoot = "/r"\n'))
    assert config.runc.root == "/r"


def test_runc_options_pass_through():
    runc = runc_options_pb2.Options(binary_name="runc", io_uid=5)
    wrapped = any_pb2.Any(type_url="containerd.runc.v1.Options", value=runc.SerializeToString())
    assert runtime_options.from_any(wrapped).runc == runc


def test_runc_options_take_kybernate_settings_from_the_node_file(tmp_path, monkeypatch):
    node = tmp_path / "runtime.toml"
    node.write_text('Root = "/ignored"\n[kybernate]\nlock_timeout_ms = 1234\n')
    monkeypatch.setenv("KYBERNATE_CONFIG", str(node))
    runc = runc_options_pb2.Options(root="/given")
    wrapped = any_pb2.Any(type_url="containerd.runc.v1.Options", value=runc.SerializeToString())
    config = runtime_options.from_any(wrapped)
    assert config.runc == runc  # containerd's runc options win whole
    assert config.kybernate.lock_timeout_ms == 1234


def test_runc_options_with_a_broken_node_file_fail_clearly(tmp_path, monkeypatch):
    node = tmp_path / "runtime.toml"
    node.write_text('Bogus = 1\n')
    monkeypatch.setenv("KYBERNATE_CONFIG", str(node))
    wrapped = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"")
    with pytest.raises(runtime_options.OptionsError, match="unknown key 'Bogus'"):
        runtime_options.from_any(wrapped)


def test_the_shipped_runtime_toml_is_valid():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "containerd-config" / "runtime.toml").read_text()
    config = runtime_options.from_toml(text, "runtime.toml")
    assert config.kybernate == KybernateOptions(hookd_timeout_s=600.0)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"Root = ", "not valid TOML"),
        (b'Bogus = "x"', "unknown key 'Bogus'"),
        (b"Root = 3", "Root must be str"),
        (b"IoUid = -1", "out of range"),
        (b"[kybernate]\nlock_timeout_ms = true", "must be an integer"),
        (b"[kybernate]\nnope = 1", "unknown key kybernate.nope"),
        (b"kybernate = 1", r"\[kybernate\] must be a table"),
    ],
)
def test_bad_options_are_refused_with_the_key_named(body, message):
    with pytest.raises(OptionsError, match=message):
        runtime_options.from_any(_cri_any(config_body=body))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(OptionsError, match="cannot read runtime options file .*missing.toml"):
        runtime_options.from_any(_cri_any(config_path=str(tmp_path / "missing.toml")))


def test_foreign_option_types_and_garbage_are_refused():
    with pytest.raises(OptionsError, match="not supported"):
        runtime_options.from_any(any_pb2.Any(type_url="example.Other", value=b""))
    with pytest.raises(OptionsError, match="not a protobuf Any"):
        runtime_options.from_any_bytes(b"\xff\xff\xff")
