"""Reading a job file: safe YAML, ``--set a.b=value`` overrides, then the checks of ``job_from_dict``."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ngd_dist.service.jobs.errors import JobError, show
from ngd_dist.service.jobs.schema import Job, job_from_dict, job_to_dict

_MERGE_TAG = "tag:yaml.org,2002:merge"


class JobLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a number (YAML 1.2) and rejects duplicate keys.

    Plain PyYAML (YAML 1.1) reads ``1e-3`` and ``1.0e3`` as strings, which would turn the most
    common way of writing a damping or learning rate into a type error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Build a mapping, refusing a key written twice (merge keys ``<<`` may still be overridden)."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first written on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: ``line L, column C: problem``."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"invalid YAML at {where}{problem}{context}"
    return f"invalid YAML: {err}"


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text safely (no Python objects); JobError naming ``source`` and the line on failure."""
    try:
        return yaml.load(text, Loader=JobLoader)  # JobLoader is a SafeLoader: no Python objects
    except yaml.YAMLError as err:
        raise JobError(_yaml_problem(err), source=source) from None


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a job file (an empty file is an empty mapping: every default)."""
    source = str(path)
    file = Path(path)
    if not file.is_file():
        reason = "is a directory" if file.is_dir() else "does not exist"
        raise JobError(f"job file {source!r} {reason}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(f"cannot read job file {source!r}: {err}") from None
    data = parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise JobError.invalid("", data, "a mapping of sections (model, data, batch, ...)").with_source(
            source
        )
    return dict(data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=0.5"`` -> ``(["optimizer", "lr"], 0.5)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts):
        raise JobError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. optimizer.lr=0.05")
    try:
        value = parse_yaml(raw, "--set")
    except JobError as err:
        raise JobError(f"--set {text!r}: {err.detail}") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``"a.b=value"`` set (missing mappings on the way are created).

    Setting a key replaces its value (``--set optimizer={name: adamw}`` replaces the section);
    whether the key exists is checked afterwards, by ``job_from_dict``.
    """
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, Mapping) and not isinstance(child, dict):
                child = node[part] = dict(child)
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise JobError(f"--set {text!r}: {where} is {show(child)}, not a mapping", path=where)
            node = child
        node[parts[-1]] = value
    return out


def _blame(err: JobError, overrides: Sequence[str]) -> JobError:
    """Add ``(set by --set a.b=v)`` to an error about a key that an override set."""
    if not err.path:
        return err
    for text in reversed(overrides):
        key = ".".join(parse_override(text)[0])
        if err.path == key or err.path.startswith(key + ".") or key.startswith(err.path + "."):
            return err.with_note(f"set by --set {text}")
    return err


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> Job:
    """Read the job file at ``path``, apply ``--set`` overrides (``"a.b=value"``, value as YAML), check it.

    Raises ``JobError`` with a one-line message (file, key path, value, what is allowed) on the
    first problem: missing file, YAML syntax, unknown key (with a "did you mean"), bad value.
    """
    source = str(path)
    data = apply_overrides(read_job_file(path), overrides)
    try:
        return job_from_dict(data, source)
    except JobError as err:
        raise _blame(err, overrides) from None


def job_to_yaml(job: Job) -> str:
    """The job as YAML text, every key written (what ``ngd-dist validate`` can print)."""
    return yaml.safe_dump(job_to_dict(job), sort_keys=False, default_flow_style=None)
