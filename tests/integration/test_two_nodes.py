"""A checkpoint moves between two "nodes": two containerds, each in a network namespace of its own
(made with pyroute2), each with its own CNI bridge and pod subnet. The archive is copied from one
node's checkpoint directory to the other's, and a new pod there carries on, with its listening socket."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, wait_for
from pyroute2 import NetNS, netns

pytestmark = pytest.mark.stack
ANNOTATION = "kybernate.io/restore-from"
# A web server (a listening socket) and the counter. httpd stays in the foreground as the shell's child:
# a daemonised one would be re-parented outside the container's process tree, which CRIU dumps.
WORKLOAD = "mkdir -p /www && echo alive > /www/x && httpd -f -p 8080 -h /www & " + COUNTER


@pytest.fixture
def nodes() -> Iterator[tuple[str, str]]:
    names = (f"kyb-node-a-{secrets.token_hex(3)}", f"kyb-node-b-{secrets.token_hex(3)}")
    for name in names:
        netns.create(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    try:
        yield names
    finally:
        for name in names:
            netns.remove(name)


def links(name: str) -> set[str]:
    with NetNS(name) as ns:
        return {link.get_attr("IFLA_IFNAME") for link in ns.get_links()}


def fetch(node: str, ip: str) -> str:
    """GET http://ip:8080/x from inside the node's network namespace."""
    client = (f"import urllib.request; print(urllib.request.urlopen('http://{ip}:8080/x', timeout=3).read().decode(),"
              " end='')")
    r = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", client],
                       capture_output=True, text=True, timeout=20)
    return r.stdout


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


@pytest.mark.parametrize("target", ["1.6", "2.1"])
def test_a_checkpoint_moves_to_another_node_and_carries_on(nodes, kyb_factory, tmp_path: Path, target: str) -> None:
    node_a, node_b = nodes
    dirs = {n: tmp_path / n / "checkpoints" for n in nodes}
    for d in dirs.values():
        d.mkdir(parents=True)
    a = kyb_factory("2.1", runtime_toml=f'[kybernate]\ncheckpoint_dir = "{dirs[node_a]}"\n', netns=node_a)
    b = kyb_factory(target, runtime_toml=f'[kybernate]\ncheckpoint_dir = "{dirs[node_b]}"\n', netns=node_b)

    with a.cri() as cri:
        config = cri.pod_config("web")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        ip_a = cri.pod_status(pod).network.ip
        cid = cri.create_container(pod, config, "web", BUSYBOX_IMAGE, command=["sh", "-c", WORKLOAD])
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 15)
        assert wait_for("the web server on node A", lambda: fetch(node_a, ip_a)) == "alive\n"
        # Read before the checkpoint: the container runs on after it, the dump holds the count of its moment.
        before = counts(cri, cid)[-1]
        cri.checkpoint_container(cid, dirs[node_a] / "web.tar")
        cri.stop_pod(pod)
        cri.remove_pod(pod)

    # Each node's pod network lives in its node's namespace, not on the host.
    assert a.bridge in links(node_a) and b.bridge not in links(node_a)
    assert not Path("/sys/class/net", a.bridge).exists()

    shutil.copy(dirs[node_a] / "web.tar", dirs[node_b] / "web.tar")  # the move
    with b.cri() as cri:
        config = cri.pod_config("web", annotations={ANNOTATION: "web.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        ip_b = cri.pod_status(pod).network.ip
        cid = cri.create_container(pod, config, "web", BUSYBOX_IMAGE, command=["sh", "-c", WORKLOAD])
        cri.start_container(cid)
        assert counts(cri, cid)[-1] >= before  # restored, not started afresh
        restored = wait_for("the counter to move on", lambda: (n := counts(cri, cid)) and n[-1] > before + 1 and n)
        assert restored == list(range(len(restored)))
        # A new pod on another node: a new address from node B's subnet, and the restored listening
        # socket answers on it.
        assert ip_b != ip_a and ipaddress.ip_address(ip_b) in ipaddress.ip_network(b.subnet)
        assert wait_for("the restored web server on node B", lambda: fetch(node_b, ip_b)) == "alive\n"
        # Node A's network cannot reach it: the nodes are apart.
        assert fetch(node_a, ip_b) == ""


def test_an_established_tcp_connection_fails_the_checkpoint_and_the_container_runs_on(kyb_factory, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    c = kyb_factory("2.1", runtime_toml=f'[kybernate]\ncheckpoint_dir = "{checkpoints}"\n')
    # A client holding a TCP connection open to the container's own web server.
    hold = "sleep 600 | nc 127.0.0.1 8080 & "
    with c.cri() as cri:
        config = cri.pod_config("tcp")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "web", BUSYBOX_IMAGE,
                                   command=["sh", "-c", "mkdir -p /www && httpd -f -p 8080 -h /www & sleep 1; " + hold + COUNTER])
        cri.start_container(cid)
        wait_for("the connection", lambda: " 01 " in cri.exec_sync(cid, ["cat", "/proc/net/tcp"]).stdout.decode())
        with pytest.raises(Exception) as failure:
            cri.checkpoint_container(cid, checkpoints / "tcp.tar")
        message = str(failure.value)
        assert "criu failed" in message, message
        # CRIU's own log, named in the error, says why: the connected TCP socket.
        log_path = message.split("path=")[-1].split('"')[0].strip()
        assert "TCP" in Path(log_path).read_text(errors="replace"), log_path
        assert not (checkpoints / "tcp.tar").exists()
        last = counts(cri, cid)[-1]
        wait_for("the container to run on", lambda: counts(cri, cid)[-1] > last)
