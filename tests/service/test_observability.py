"""The health endpoint and the metrics port seen from outside a real ``ngd-dist train`` process.

The stall test pauses the actual training loop: the job's model (tests/fixtures/stall_model.py)
blocks inside its forward pass after a number of steps until the test creates a file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ngd_dist.testing.distributed import free_port
from tests.support import (
    CLI,
    QUICK,
    ROOT,
    cli_env,
    http_get,
    kill_tree,
    run_cli,
    sets,
    start_cli,
    try_http_get,
    wait_until,
)


def _step_of(body: str) -> int | None:
    match = re.fullmatch(r"ok step (\d+)\s*", body)
    return int(match.group(1)) if match else None


def test_healthz_turns_503_while_the_training_loop_is_stuck_and_200_when_it_moves_again(tmp_path: Path) -> None:
    pause_after, steps = 12, 40
    port = free_port()
    release = tmp_path / "release"
    model = {
        "name": "tests.fixtures.stall_model:make_model",
        "args": {"release_file": str(release), "pause_after": pause_after, "step_sleep": 0.05, "max_wait": 90},
    }
    env = cli_env(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = start_cli(
            "train", QUICK,
            *sets(f"model={json.dumps(model)}", "preconditioner.output_module=head", "batch.per_rank=64",
                  f"train.steps={steps}", "checkpoint.every=0", f"checkpoint.dir={tmp_path / 'checkpoints'}",
                  f"metrics.port={port}", "metrics.stall_seconds=1.0"),
            stderr=err, env=env,
        )  # fmt: skip
    health = f"http://127.0.0.1:{port}/healthz"

    def watch(what: str, until: Callable[[tuple[int, str]], bool], timeout: float) -> tuple[int, str]:
        """The first /healthz reply for which ``until(reply)``; fails naming ``what`` if the job exits
        or time runs out."""

        def reply_until() -> tuple[int, str] | None:
            reply = try_http_get(health)
            return reply if reply is not None and until(reply) else None

        return wait_until(reply_until, timeout, what, proc=proc, details=lambda: err_path.read_text()[-3000:],
                          interval=0.05)  # fmt: skip

    try:
        # 1. stepping: /healthz is 200 and names a step that moves
        stepping: set[int] = set()

        def two_steps(reply: tuple[int, str]) -> bool:
            step = _step_of(reply[1]) if reply[0] == 200 else None
            if step:
                stepping.add(step)
            return len(stepping) >= 2

        watch("two steps seen while training", two_steps, 60)
        assert max(stepping) <= pause_after
        # 2. stuck inside step pause_after + 1: 503 naming the last finished step, counters frozen
        reply = watch("/healthz to turn 503 while the loop is paused",
                      lambda r: r[0] == 503 and f"at step {pause_after} " in r[1], 30)  # fmt: skip
        assert reply[1].startswith("stalled since "), reply
        assert "stall_seconds=1" in reply[1], reply
        frozen = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert f'ngd_steps_total{{rank="0"}} {pause_after}.0' in frozen
        time.sleep(0.5)
        assert (try_http_get(health) or (0, ""))[0] == 503
        assert f'ngd_steps_total{{rank="0"}} {pause_after}.0' in http_get(f"http://127.0.0.1:{port}/metrics")[1]
        # 3. released: healthy again at a later step, and the job finishes normally
        release.touch()
        watch("/healthz to recover after the loop was released",
              lambda r: r[0] == 200 and (_step_of(r[1]) or 0) > pause_after, 30)  # fmt: skip
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate()
    assert proc.returncode == 0, err_path.read_text()[-3000:]
    assert f"done: steps={steps} " in out, out


def test_a_taken_metrics_port_stops_the_cli_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "train", QUICK, *sets(f"metrics.port={port}", "train.steps=5", f"checkpoint.dir={tmp_path / 'checkpoints'}"),
            timeout=120,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("ngd-dist train: metrics.port: ")
    assert f"127.0.0.1:{port}" in line, line
    assert "metrics.port to 0" in line, line
    assert result.stdout == ""
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def _train_on_a_terminal(tmp_path: Path, *overrides: str) -> str:
    """``ngd-dist train`` of the quickstart with stderr on a pseudo-terminal; what it wrote there."""
    import fcntl
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen(
        [CLI, "train", QUICK, *sets(*overrides)], cwd=ROOT, env=cli_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(timeout=120)
    assert proc.returncode == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode(errors="replace")


RUN = ("metrics.port=0", "train.steps=20", "train.log_every=5", "train.eval_every=10", "checkpoint.every=10")


def test_on_a_terminal_log_lines_start_on_a_line_of_their_own_while_the_bar_is_drawn(tmp_path: Path) -> None:
    err = _train_on_a_terminal(tmp_path, *RUN, f"checkpoint.dir={tmp_path}")
    assert "%|" in err  # the bar is drawn
    logged = [line for line in err.replace("\r\n", "\n").split("\n") if "[rank 0] INFO" in line]
    assert any("checkpoint: saved step 10" in line for line in logged), err[-3000:]
    assert any("step 10: eval_loss=" in line for line in logged), err[-3000:]
    for line in logged:  # what the terminal shows: the text after the last carriage return
        assert line.split("\r")[-1].startswith("[rank 0] INFO"), repr(line)


def test_without_a_terminal_progress_is_plain_periodic_lines(tmp_path: Path) -> None:
    result = run_cli("train", QUICK, *sets(*RUN, f"checkpoint.dir={tmp_path}"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    assert "%|" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("[rank 0] INFO step ") and "/20 " in line]
    assert [line.split()[4] for line in progress] == ["5/20", "10/20", "15/20", "20/20"], result.stderr[-3000:]
    assert all(re.search(r" loss=\d+\.\d{4} samples_per_s=\d+", line) for line in progress), progress
