import pytest

from kybernate.shim.cli import ShimArgs, UsageError, main, parse_args


def test_parses_the_start_command_line_containerd_sends():
    args = parse_args(
        ["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
         "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"]
    )
    assert args == ShimArgs(
        namespace="k8s.io", address="/run/containerd/containerd.sock", publish_binary="/usr/bin/containerd",
        id="abc", debug=True, action="start",
    )


def test_accepts_go_flag_spellings():
    args = parse_args(["--namespace=default", "-id=x", "-bundle", "/b", "delete"])
    assert (args.namespace, args.id, args.bundle, args.action) == ("default", "x", "/b", "delete")


def test_child_flags_hand_on_everything_but_the_action():
    args = parse_args(["-namespace", "n", "-address", "/a", "-publish-binary", "/c", "-id", "i", "-debug", "start"])
    assert args.child_flags() == ["-namespace", "n", "-address", "/a", "-publish-binary", "/c", "-id", "i", "-debug"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-namespace"], "needs a value"),
        (["-bogus", "start"], "unknown flag -bogus"),
        (["-namespace", "n", "start", "extra"], "unexpected arguments"),
    ],
)
def test_rejects_command_lines_containerd_would_not_send(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_version_prints_only_the_version(capsys):
    assert main(["-v"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("containerd-shim-kybernate-v1:\n  Version:")
    assert out.err == ""


def test_missing_namespace_is_a_clear_error_on_stderr_only(capsys):
    assert main(["-id", "x", "start"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "namespace cannot be empty" in out.err


def test_unknown_action_is_refused(capsys):
    assert main(["-namespace", "n", "-id", "x", "serve"]) == 2
    assert "unknown action 'serve'" in capsys.readouterr().err
