"""Prometheus, Grafana and alert rules against the real thing.

A real Prometheus server (Debian's binary) scrapes both ranks of a running 2-rank torchrun job
(one job and one server shared by the tests of this module); promtool checks the exposition of a
live scrape, the alert rules (with their unit tests in docker/prometheus/alerts_test.yml) and the
compose configuration; every query of the Grafana dashboard is run against the live server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ngd_dist.testing.distributed import free_port, free_ports
from tests.support import QUICK, ROOT, http_get, kill_tree, sets, start_cli, wait_until

DOCKER = ROOT / "docker"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
ALERTS_TEST = DOCKER / "prometheus" / "alerts_test.yml"
PROMETHEUS_YML = DOCKER / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "ngd_dist.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "ngd_dist.yml"

ALERT_NAMES = {
    "NgdTrainingStalled",
    "NgdTargetDown",
    "NgdThroughputDrop",
    "NgdNonFiniteStatistics",
    "NgdNonFiniteLoss",
    "NgdSkippedSteps",
    "NgdDecompositionFailures",
    "NgdCheckpointOverdue",
}

# What the dashboard's Grafana variables stand for when its queries are run here.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m", "$job": ".*", "$rank": ".*"}


def tool(name: str) -> str:
    """Path of a Prometheus binary (Debian's ``prometheus`` package, installed by ``make test``)."""
    exe = shutil.which(name)
    assert exe, f"{name} not found: `make test` installs Debian's prometheus package (server and promtool)"
    return exe


def sample_names(exposition: str) -> set[str]:
    """The exact series names of a Prometheus text exposition (``_bucket``, ``_total``, ... included)."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# -- PromQL metric names ---------------------------------------------------------------------------

_NOT_METRICS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and numbers left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before in ".$":  # 1e3, 0.5e-3, $variable
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group().lower() in _NOT_METRICS:
            continue
        names.add(match.group())
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query target of every panel (rows' nested panels too)."""
    out = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def variable_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Metric names the dashboard's ``label_values(metric{...}, label)`` variables read."""
    names = set()
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,\s*\w+\s*\)", query)
        assert match, f"variable {var['name']}: unexpected query {query!r}"
        names.add(match.group(1))
    return names


def grafana_to_promql(expr: str) -> str:
    """``expr`` with the dashboard's Grafana variables replaced (longest names first)."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def load_dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


# -- the running job and the Prometheus server scraping it ------------------------------------------


@dataclass
class Stack:
    """A 2-rank training job and a Prometheus server scraping it."""

    job: subprocess.Popen[str]
    base_port: int
    prometheus: subprocess.Popen[str]
    prometheus_url: str
    workdir: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; fails the test on an API error."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        reply = json.loads(body)
        assert status == 200, f"{expr}: {status} {body[:500]}"
        assert reply["status"] == "success", f"{expr}: {body[:500]}"
        assert reply["data"]["resultType"] == "vector", reply["data"]["resultType"]
        return list(reply["data"]["result"])

    def scrape(self, rank: int) -> str:
        """The /metrics body of one rank of the job."""
        status, text = http_get(f"http://127.0.0.1:{self.base_port + rank}/metrics")
        assert status == 200
        return text

    def diagnostics(self) -> str:
        """The tails of the job's and Prometheus's logs, for failure messages."""
        parts = []
        for name in ("job.err", "prometheus.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)


def _wait(what: str, predicate: Any, timeout: float, stack: Stack) -> Any:
    """``wait_until`` on the stack: a query failing meanwhile (nothing scraped yet) counts as not yet."""
    return wait_until(predicate, timeout, what, proc=stack.job, details=stack.diagnostics, interval=0.25,
                      ignore=(OSError, ValueError, KeyError))  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One running 2-rank job (quality metrics on) scraped every second by a real Prometheus."""
    prometheus_exe = tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    base = free_ports(2)
    job_err = (workdir / "job.err").open("w")
    job = start_cli(
        "launch", QUICK, "--launcher", "torchrun", "--nproc", "2",
        *sets(f"checkpoint.dir={workdir / 'checkpoints'}", "checkpoint.resume=never", "train.steps=1000000",
              "checkpoint.every=50", f"metrics.port={base}", "metrics.quality_every=2"),
        stdout=subprocess.DEVNULL, stderr=job_err,
    )  # fmt: skip
    prometheus: subprocess.Popen[str] | None = None
    try:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "ngd_dist",
                    "static_configs": [{"targets": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen(
            [
                prometheus_exe, f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h", "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"), text=True,
            start_new_session=True,
        )
        s = Stack(job=job, base_port=base, prometheus=prometheus, prometheus_url=f"http://127.0.0.1:{port}",
                  workdir=workdir)
        _wait("Prometheus to be ready", lambda: http_get(f"{s.prometheus_url}/-/ready")[0] == 200, 30, s)
        yield s
    finally:
        kill_tree(job.pid)
        job.wait(timeout=30)
        job_err.close()
        if prometheus is not None:
            os.killpg(prometheus.pid, signal.SIGTERM)
            try:
                prometheus.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(prometheus.pid, signal.SIGKILL)
                prometheus.wait(timeout=10)


def _both_ranks_positive(stack: Stack, expr: str) -> dict[str, float] | None:
    values = {r["metric"].get("rank", ""): float(r["value"][1]) for r in stack.query(expr)}
    return values if set(values) == {"0", "1"} and all(v > 0 for v in values.values()) else None


# -- tests against the live stack ---------------------------------------------------------------------


def test_prometheus_scrapes_the_throughput_of_both_ranks(stack: Stack) -> None:
    values = _wait(
        "ngd_samples_per_second of both ranks in Prometheus",
        lambda: _both_ranks_positive(stack, 'ngd_samples_per_second{job="ngd_dist"}'),
        90,
        stack,
    )
    assert values["0"] > 0
    assert values["1"] > 0
    up = {r["metric"]["instance"]: r["value"][1] for r in stack.query('up{job="ngd_dist"}')}
    assert up == {f"127.0.0.1:{stack.base_port}": "1", f"127.0.0.1:{stack.base_port + 1}": "1"}
    # the step counter advances between scrapes: this is a live job, not a stale sample
    steps = _wait("ngd_steps_total to advance", lambda: _both_ranks_positive(
        stack, 'increase(ngd_steps_total{job="ngd_dist"}[5s])'), 30, stack)
    assert min(steps.values()) > 0
    # the gradient norm is reported (K-FAC computes it with its KL-clip sum) and equal on both ranks
    norms = _wait("ngd_grad_norm of both ranks", lambda: _both_ranks_positive(stack, 'ngd_grad_norm{job="ngd_dist"}'),
                  30, stack)
    assert min(norms.values()) > 0


def test_each_phase_of_a_step_is_timed(stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _wait("both ranks to have stepped", lambda: _both_ranks_positive(stack, "ngd_steps_total"), 90, stack)
    for rank in (0, 1):
        sums = {
            s.labels["phase"]: s.value
            for family in text_string_to_metric_families(stack.scrape(rank))
            if family.name == "ngd_phase_seconds"
            for s in family.samples
            if s.name == "ngd_phase_seconds_sum"
        }
        for phase in ("forward", "backward", "factor_computation", "decomposition", "preconditioning", "optimizer"):
            assert sums.get(phase, 0.0) > 0, (rank, phase, sums)


def test_promtool_check_metrics_accepts_a_live_scrape(stack: Stack) -> None:
    promtool = tool("promtool")
    _wait("both ranks to have stepped", lambda: _both_ranks_positive(stack, "ngd_steps_total"), 90, stack)
    for rank in (0, 1):
        body = stack.scrape(rank)
        assert f'ngd_steps_total{{rank="{rank}"}}' in body
        result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout}{result.stderr}"
        assert result.stdout.strip() == "", result.stdout + result.stderr
        assert result.stderr.strip() == "", result.stdout + result.stderr


def test_every_dashboard_metric_appears_in_a_live_scrape(stack: Stack) -> None:
    _wait("both ranks to have stepped", lambda: _both_ranks_positive(stack, "ngd_steps_total"), 90, stack)
    _wait("ngd_quality_gamma on both ranks (metrics.quality_every=2)", lambda: all(
        f'ngd_quality_gamma{{rank="{rank}"}}' in stack.scrape(rank) for rank in (0, 1)), 30, stack)
    scraped = sample_names(stack.scrape(0)) | sample_names(stack.scrape(1))
    dashboard = load_dashboard()
    for title, expr in dashboard_queries(dashboard):
        missing = promql_metric_names(expr) - scraped
        assert not missing, f"panel {title!r}: {sorted(missing)} not in a scrape of the running job ({expr})"
    variables = variable_metric_names(dashboard)
    assert variables, "the dashboard has no label_values() variables"
    assert variables <= scraped, sorted(variables - scraped)


def test_every_dashboard_query_returns_data_from_prometheus(stack: Stack) -> None:
    _wait("both ranks' throughput", lambda: _both_ranks_positive(stack, "ngd_samples_per_second"), 90, stack)
    dashboard = load_dashboard()
    for title, expr in dashboard_queries(dashboard):
        promql = grafana_to_promql(expr)
        result = _wait(f"data for panel {title!r}: {promql}", lambda q=promql: stack.query(q), 20, stack)
        assert result, (title, promql)
    for var in dashboard["templating"]["list"]:
        metric = variable_metric_names({"templating": {"list": [var]}}).pop()
        label = var["query"]["query"].rsplit(",", 1)[1].strip(" )")
        values = {r["metric"][label] for r in stack.query(metric)}
        assert values, var["name"]
    ranks = {r["metric"]["rank"] for r in stack.query("ngd_steps_total")}
    assert ranks == {"0", "1"}


def test_alert_rules_load_and_evaluate_cleanly_on_a_healthy_job(stack: Stack) -> None:
    _wait("both ranks' throughput", lambda: _both_ranks_positive(stack, "ngd_samples_per_second"), 90, stack)
    data_since = time.time()

    def evaluated() -> list[dict[str, Any]] | None:
        status, body = http_get(f"{stack.prometheus_url}/api/v1/rules?type=alert")
        groups = json.loads(body)["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        # every rule evaluated since the job's series were in the database (evaluation_interval 1 s)
        done = all(_unix(rule["lastEvaluation"]) > data_since + 0.5 for rule in rules)
        return rules if status == 200 and rules and done else None

    rules = _wait("the alert rules to be evaluated on the job's series", evaluated, 30, stack)
    assert {rule["name"] for rule in rules} == ALERT_NAMES
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        # Nothing may even be pending on a healthy job, except: the throughput may dip while the job
        # warms up, and a scrape may time out (1 s) on a loaded machine.
        if rule["name"] not in ("NgdThroughputDrop", "NgdTargetDown"):
            assert rule["state"] == "inactive", (rule["name"], rule["state"], rule["alerts"])


def _unix(rfc3339: str) -> float:
    """Seconds since the epoch of a Prometheus API timestamp (nanoseconds cut to microseconds)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert match, rfc3339
    stamp = datetime.fromisoformat(match.group(1) + match.group(3).replace("Z", "+00:00"))
    return stamp.timestamp() + float("0." + (match.group(2) or "0"))


# -- static checks (no job) ------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts() -> None:
    result = subprocess.run([tool("promtool"), "test", "rules", str(ALERTS_TEST)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERTS_TEST.read_text()))
    assert tested == ALERT_NAMES


def test_promtool_check_config_of_the_compose_layout(tmp_path: Path) -> None:
    # In compose, prometheus.yml and alerts.yml both sit in /etc/prometheus; rule_files paths are
    # resolved against the config file's folder, so check a copy laid out the same way.
    shutil.copy(PROMETHEUS_YML, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = subprocess.run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (scrape,) = config["scrape_configs"]
    assert scrape["job_name"] == "ngd_dist"
    assert scrape["static_configs"] == [{"targets": ["trainer:9400", "trainer:9401"]}]


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"]
    expected = {"type": "prometheus", "uid": source["uid"]}
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = load_dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, (panel["title"], target["refId"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"] == expected, var["name"]
    referenced = set().union(*(promql_metric_names(expr) for _, expr in dashboard_queries(dashboard)))
    assert {
        "ngd_samples_per_second", "ngd_job_samples_per_second", "ngd_job_tokens_per_second",
        "ngd_phase_seconds_bucket", "ngd_phase_seconds_sum", "ngd_communication_bytes_total",
        "ngd_refresh_interval_steps", "ngd_loss", "ngd_grad_norm", "ngd_damping", "ngd_kl_clip_scale",
        "ngd_quality_gamma", "ngd_decompositions_total", "ngd_decomposition_failures_total",
        "ngd_nonfinite_rejected_total", "ngd_skipped_steps_total", "ngd_seconds_since_checkpoint",
    } <= referenced


def test_promql_metric_name_extraction() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.9, sum by (phase, le) (rate(ngd_phase_seconds_bucket{rank=~"$rank"}[$__rate_interval])))'
    ) == {"ngd_phase_seconds_bucket"}
    assert promql_metric_names(
        "sum by (kind) (rate(ngd_communication_bytes_total[1m])) / on() group_left() sum(rate(ngd_steps_total[1m]))"
    ) == {"ngd_communication_bytes_total", "ngd_steps_total"}
    assert promql_metric_names('time() - ngd_last_step_timestamp_seconds{job=~"a|b"} > 1e3 offset 5m') == {
        "ngd_last_step_timestamp_seconds"
    }
    assert promql_metric_names("ngd_loss != ngd_loss or abs(ngd_phase_seconds) == Inf") == {
        "ngd_loss", "ngd_phase_seconds"
    }
    assert sample_names('# TYPE a histogram\na_bucket{le="1"} 1\na_sum 2\nb_total{x="y"} 3\n') == {
        "a_bucket", "a_sum", "b_total"
    }
