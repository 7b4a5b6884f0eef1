"""The GPU `resilience` scenario's CPU-testable parts (tests/gpu/scenario.py, tests/gpu/server.py): the
inference-style server's py backend answers deterministically across restarts, the first-answer poller
waits for it, and the store helpers read generations as the store writes them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[2] / "gpu"
sys.path.insert(0, str(GPU))
import scenario  # noqa: E402

from kybernate.hooks.api.store import Identity, Store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(weights: Path, out: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(GPU / "server.py"), "serve", "--weights", str(weights), "--port",
                             str(port), "--out-dir", str(out), "--backend", "py", "--warmup", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def test_the_py_server_answers_the_same_after_a_restart(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    subprocess.run([sys.executable, str(GPU / "server.py"), "make-weights", "--weights", str(weights), "--mib", "1",
                    "--backend", "py"], check=True, timeout=120)
    assert weights.stat().st_size >= 1 << 20
    answers = []
    for _ in range(2):
        port = free_port()
        proc = serve(weights, tmp_path, port)
        try:
            answers.append(scenario.first_answer(port, timeout=60))
        finally:
            proc.kill()
            proc.wait()
    assert answers[0] == answers[1] and len(answers[0].split()) == 2
    log = (tmp_path / "server.log").read_text()
    assert "weights loaded" in log and "warmed up (3 requests)" in log and "listening on" in log


def test_first_answer_gives_up_naming_the_port() -> None:
    port = free_port()
    with pytest.raises(scenario.StepError, match=f"no answer on port {port}"):
        scenario.first_answer(port, timeout=0.0)


def test_store_generations_counts_complete_ones_only(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    for _ in range(2):
        pending = store.begin("resil-train")
        (Path(pending.temp) / "f").write_text("x")
        pending.commit(Identity(container_id="c"))
    (tmp_path / "resil-train" / "9").mkdir()  # torn: no manifest
    assert scenario.store_generations(str(tmp_path), "resil-train") == [1, 2]
    assert scenario.store_generations(str(tmp_path), "other") == []
    scenario.clear_key(str(tmp_path), "resil-train")
    assert scenario.store_generations(str(tmp_path), "resil-train") == []


def test_resilience_is_a_scenario_and_needs_the_kybernate_runtime() -> None:
    assert "resilience" in scenario.ALL_SCENARIOS
    runner = object.__new__(scenario.Runner)
    runner.a = type("A", (), {"runtime": "runc"})()
    with pytest.raises(scenario.StepError, match="--runtime kybernate"):
        runner.s_resilience({})
