"""Hostile job files and ``--set`` values: alias bombs, deep nesting, huge files and numbers.

Each input goes through the ``ngd-dist`` command (validate, train or launch --dry-run) in a child
process whose time is bounded (a timeout) and whose memory is watched (killed past a cap, so a bomb
cannot take the machine down). What must hold: a one-line error and exit code 2, or acceptance, in at
most 2 s of CPU and 200 MB of memory more than validating the quickstart takes.

The children are forked from one process that imported the command's module (the ``commands``
fixture, :class:`tests.support.CommandServer`) and run its entry point, ``ngd_dist.cli:main``, as the
console script does: each input costs its own work, not another second or two of importing torch.
The CPU time and peak memory are the child's own, and the quickstart's baseline is measured the same
way.

The in-process tests pin down the parts: :func:`show` never formats a whole unbounded value, and
the loader refuses before it builds an expanded value.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ngd_dist.service.jobs import JobError, load_job, parse_yaml
from ngd_dist.service.jobs.errors import show
from ngd_dist.service.jobs.loader import MAX_DEPTH, MAX_JOB_BYTES, MAX_NODES
from tests.support import QUICK, CommandServer, Measured, sets

CPU_BUDGET_S = 2.0
"""CPU seconds an input may cost beyond validating the quickstart."""
MEMORY_BUDGET_MB = 200.0
"""Peak memory (RSS) an input may cost beyond validating the quickstart."""
WATCHDOG_MB = 600.0
"""Past this much more than the quickstart's peak the child is killed (the test then fails)."""


@pytest.fixture(scope="module")
def baseline(commands: CommandServer, tmp_path_factory: pytest.TempPathFactory) -> Measured:
    """What validating the quickstart costs (the lowest of two runs)."""
    tmp = tmp_path_factory.mktemp("baseline")
    runs = [commands.run(["validate", QUICK], tmp, rss_cap_mb=4096) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    return min(runs, key=lambda r: r.cpu_s)


# -- hostile inputs ----------------------------------------------------------------------------


def _bomb(levels: int = 9, width: int = 9) -> str:
    """A flow mapping of ``levels`` anchors, each a list of ``width`` aliases of the previous one:
    ``width ** levels`` strings once expanded (387 million by default), 400 bytes of text."""
    items = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    items += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "{" + ", ".join(items) + "}"


def _quick_text() -> str:
    return Path(QUICK).read_text()


def _job_with_args(value: str) -> str:
    """The quickstart with ``model.args`` replaced by ``value`` (YAML flow text)."""
    return _quick_text().replace("args: {in_features: 64, hidden: 128, classes: 10}", f"args: {value}")


def _padded(text: str, size: int) -> str:
    """``text`` followed by comment lines up to exactly ``size`` bytes."""
    line = "# " + "x" * 97 + "\n"
    body = text + line * ((size - len(text)) // len(line))
    return body + "#" * (size - len(body) - 1) + "\n"


DEEP = 100_000


def _file_cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    """Name -> (CLI arguments, expected exit code, fragment of the error line or of stdout)."""
    files = {
        "bomb": _job_with_args(f"{{in_features: 64, hidden: 128, classes: 10, extra: {_bomb()}}}"),
        "recursive-alias": _job_with_args("&a {in_features: 64, hidden: 128, classes: 10, self: *a}"),
        "deep": _job_with_args("{deep: " + "[" * DEEP + "]" * DEEP + "}"),
        "deep-block": "model:\n  args:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(600)),
        "50MB": _padded(_quick_text(), 50 * 1_000_000),
        "1MB-list": _job_with_args("{xs: [" + ", ".join(["1"] * 340_000) + "]}"),
        "1MB-key": _quick_text() + "? " + "x" * 1_000_000 + "\n: 1\n",  # explicit key: any length
        "huge-int": _quick_text().replace("seed: 0", "seed: " + "1" * 200_000),
        "1MB-comments": _padded(_quick_text(), 1_000_000),
        "1MB-value": _quick_text().replace("name: quickstart", "name: " + "y" * 1_000_000, 1),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(text)
    return {
        "bomb": (["validate", str(paths["bomb"])], 2, "model.args.extra"),
        "bomb-train": (["train", str(paths["bomb"])], 2, "aliases expanded"),
        "recursive-alias": (["validate", str(paths["recursive-alias"])], 2, "recursive"),
        "deep": (["validate", str(paths["deep"])], 2, f"nested more than {MAX_DEPTH} deep"),
        "deep-launch": (["launch", str(paths["deep"]), "--dry-run"], 2, "model.args.deep"),
        "deep-block": (["validate", str(paths["deep-block"])], 2, f"nested more than {MAX_DEPTH} deep"),
        "50MB": (["validate", str(paths["50MB"])], 2, f"at most {MAX_JOB_BYTES} bytes"),
        "1MB-list": (["validate", str(paths["1MB-list"])], 2, "model.args.xs"),
        "1MB-key": (["validate", str(paths["1MB-key"])], 2, "unknown key 'xxxxxxxx"),
        "huge-int": (["validate", str(paths["huge-int"])], 2, "seed"),
        "1MB-comments": (["validate", str(paths["1MB-comments"])], 0, "name: quickstart"),
        "1MB-value": (["validate", str(paths["1MB-value"])], 0, "name: yyyyyyyy"),
    }


def _set_cases() -> dict[str, tuple[list[str], int, str]]:
    small_bomb = _bomb(levels=4, width=9)  # 9**4 strings, under the cap alone
    return {
        "set-bomb": (["validate", QUICK, *sets(f"model.args.extra={_bomb()}")], 2, "model.args.extra"),
        "set-bomb-train": (["train", QUICK, *sets(f"data.args={_bomb()}")], 2, "data.args"),
        "set-deep": (["validate", QUICK, *sets("model.args.x=" + "[" * 50_000 + "]" * 50_000)], 2, "--set"),
        "set-deep-key": (["validate", QUICK, *sets("model.args." + ".".join(["a"] * 30_000) + "=1")], 2, "--set"),
        "set-many-bombs": (
            ["validate", QUICK, *sets(*(f"model.args.k{i}={small_bomb}" for i in range(30)))],
            2,
            "aliases expanded",
        ),
    }


CASES = sorted(
    [
        "bomb", "bomb-train", "recursive-alias", "deep", "deep-launch", "deep-block", "50MB", "1MB-list",
        "1MB-key", "huge-int", "1MB-comments", "1MB-value", "set-bomb", "set-bomb-train", "set-deep", "set-deep-key",
        "set-many-bombs",
    ]
)  # fmt: skip


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], int, str]]:
    """Every case (its files written once, ~55 MB)."""
    return {**_file_cases(tmp_path_factory.mktemp("cases")), **_set_cases()}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_refused_in_one_line_within_budget(
    case: str, cases: dict[str, tuple[list[str], int, str]], commands: CommandServer, tmp_path: Path,
    baseline: Measured,
) -> None:
    args, code, fragment = cases[case]
    got = commands.run(args, tmp_path, rss_cap_mb=baseline.peak_mb + WATCHDOG_MB)
    assert "Traceback" not in got.stderr, got.stderr[-3000:]
    assert got.returncode == code, got.stderr[-3000:]
    if code == 2:
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1, got.stderr[-3000:]
        assert fragment in lines[0], lines[0]
        assert len(lines[0]) < 1000, lines[0][:2000]
    else:
        assert fragment in got.stdout
    cpu, memory = got.cpu_s - baseline.cpu_s, got.peak_mb - baseline.peak_mb
    assert cpu <= CPU_BUDGET_S, f"{cpu:.2f} s of CPU more than validating the quickstart"
    assert memory <= MEMORY_BUDGET_MB, f"{memory:.0f} MB more than validating the quickstart"


# -- the parts -------------------------------------------------------------------------------------


def _shared_bomb(levels: int = 40, width: int = 10) -> list[object]:
    """A Python value shaped like an alias bomb: ``width ** levels`` leaves, ``levels`` lists held."""
    value: list[object] = ["lol"] * width
    for _ in range(levels):
        value = [value] * width
    return value


def test_show_formats_only_what_it_prints() -> None:
    recursive: list[object] = [1]
    recursive.append(recursive)
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    values = {
        "bomb": _shared_bomb(),
        "recursive": recursive,
        "deep": deep,
        "huge-int": 10**200_000,
        "huge-str": "x" * 50_000_000,
        "wide-dict": {f"k{i}": i for i in range(1_000_000)},
    }
    for name, value in values.items():
        start = time.process_time()
        text = show(value)
        assert time.process_time() - start < 0.5, name
        assert len(text) <= 100, (name, text)
        assert "\n" not in text
    assert show("x" * 1000) == "'" + "x" * 96 + "..."
    assert show({"a": [1, 2.5, None, True]}) == "{'a': [1, 2.5, None, True]}"
    assert show(10**200_000).startswith("<int of ")
    error = JobError.invalid("model.args", _shared_bomb(), "a mapping")
    assert len(str(error)) < 300


def test_the_loader_refuses_a_bomb_before_expanding_it() -> None:
    start = time.process_time()
    with pytest.raises(JobError) as info:
        parse_yaml(f"model: {{args: {_bomb(levels=30, width=30)}}}", "bomb.yaml")
    assert time.process_time() - start < 1.0
    message = str(info.value)
    assert message.startswith("bomb.yaml: model.args.l"), message
    assert f"more than {MAX_NODES} values" in message
    assert info.value.path.startswith("model.args.l")


def test_limits_hold_for_the_file_and_every_override_together(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(_quick_text())
    per_set = _bomb(levels=3, width=int(MAX_NODES ** (1 / 3)) - 1)  # under the cap alone
    assert load_job(job, [f"model.args.extra={per_set}"]).model.args["extra"]
    with pytest.raises(JobError, match="aliases expanded"):
        load_job(job, [f"model.args.k{i}={per_set}" for i in range(3)])
    # nesting counts from the top of the job: the key path's mappings, then the value's lists
    depth_left = MAX_DEPTH - len(["model", "args", "x"])
    assert load_job(job, ["model.args.x=" + "[" * depth_left + "]" * depth_left])
    with pytest.raises(JobError, match=f"nested more than {MAX_DEPTH} deep") as info:
        load_job(job, ["model.args.x=" + "[" * (depth_left + 1) + "]" * (depth_left + 1)])
    assert "(set by --set model.args.x=[[[" in str(info.value)
    assert len(str(info.value)) < 400


def test_a_job_file_that_is_not_a_regular_file_is_not_read() -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(JobError, match="not a regular file"):
        load_job("/dev/zero")


def test_a_job_file_just_under_the_cap_is_read(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(_padded(_quick_text(), MAX_JOB_BYTES))
    assert load_job(job).name == "quickstart"
    job.write_text(_padded(_quick_text(), MAX_JOB_BYTES + 1))
    with pytest.raises(JobError, match=f"{MAX_JOB_BYTES + 1} bytes; expected at most {MAX_JOB_BYTES}"):
        load_job(job)
