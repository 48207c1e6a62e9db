"""The health endpoint and the metrics port seen from outside a real ``ngd-dist train`` process.

The stall test pauses the actual training loop: the job's model (tests/fixtures/stall_model.py)
blocks inside its forward pass after a number of steps until the test creates a file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ngd_dist.testing.distributed import free_port
from tests.service.test_prometheus import http_get
from tests.service.test_recovery import CLI, QUICK, ROOT, _env, _kill_tree


def _health(port: int) -> tuple[int, str] | None:
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except OSError:
        return None
    return status, body.strip()


def _step_of(body: str) -> int | None:
    match = re.fullmatch(r"ok step (\d+)", body)
    return int(match.group(1)) if match else None


def test_healthz_turns_503_while_the_training_loop_is_stuck_and_200_when_it_moves_again(tmp_path: Path) -> None:
    pause_after, steps = 12, 40
    port = free_port()
    release = tmp_path / "release"
    model = {
        "name": "tests.fixtures.stall_model:make_model",
        "args": {"release_file": str(release), "pause_after": pause_after, "step_sleep": 0.05, "max_wait": 90},
    }
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [
                CLI, "train", QUICK, "--set", f"model={json.dumps(model)}", "--set", "preconditioner.output_module=head",
                "--set", "batch.per_rank=64", "--set", f"train.steps={steps}", "--set", "checkpoint.every=0",
                "--set", f"checkpoint.dir={tmp_path / 'checkpoints'}", "--set", f"metrics.port={port}",
                "--set", "metrics.stall_seconds=1.0",
            ],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )

    def fail(what: str) -> None:
        pytest.fail(f"{what}; exit code {proc.poll()}\n{err_path.read_text()[-3000:]}")

    def poll(until: float) -> tuple[int, str] | None:
        if proc.poll() is not None:
            fail("the job exited early")
        if time.monotonic() > until:
            return None
        time.sleep(0.05)
        return _health(port)

    try:
        # 1. stepping: /healthz is 200 and names a step that moves
        stepping: set[int] = set()
        deadline = time.monotonic() + 60
        while len(stepping) < 2:
            reply = poll(deadline)
            if reply is None and time.monotonic() > deadline:
                fail(f"no two steps seen while training (saw {stepping})")
            if reply is not None and reply[0] == 200 and (step := _step_of(reply[1])):
                stepping.add(step)
        assert max(stepping) <= pause_after
        # 2. stuck inside step pause_after + 1: 503 naming the last finished step, counters frozen
        deadline = time.monotonic() + 30
        while True:
            reply = poll(deadline)
            if reply is None and time.monotonic() > deadline:
                fail("/healthz never turned 503 while the loop was paused")
            if reply is not None and reply[0] == 503 and f"at step {pause_after} " in reply[1]:
                break
        assert reply[1].startswith("stalled since ") and "stall_seconds=1" in reply[1], reply
        frozen = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert f'ngd_steps_total{{rank="0"}} {pause_after}.0' in frozen
        time.sleep(0.5)
        assert (_health(port) or (0, ""))[0] == 503
        assert f'ngd_steps_total{{rank="0"}} {pause_after}.0' in http_get(f"http://127.0.0.1:{port}/metrics")[1]
        # 3. released: healthy again at a later step, and the job finishes normally
        release.touch()
        deadline = time.monotonic() + 30
        while True:
            reply = poll(deadline)
            if reply is None and time.monotonic() > deadline:
                fail("/healthz did not recover after the loop was released")
            if reply is not None and reply[0] == 200 and (_step_of(reply[1]) or 0) > pause_after:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.communicate()
    assert proc.returncode == 0, err_path.read_text()[-3000:]
    assert f"done: steps={steps} " in out, out


def test_a_taken_metrics_port_stops_the_cli_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                CLI, "train", QUICK, "--set", f"metrics.port={port}", "--set", "train.steps=5",
                "--set", f"checkpoint.dir={tmp_path / 'checkpoints'}",
            ],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("ngd-dist train: metrics.port: ")
    assert f"127.0.0.1:{port}" in line and "metrics.port to 0" in line, line
    assert result.stdout == ""
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
