"""Reading a job file: safe, bounded YAML, ``--set a.b=value`` overrides, then ``job_from_dict``'s checks.

A job holds settings, not data, so what a job file and its ``--set`` values may hold is bounded,
and checked while the YAML is composed, before any value is built: :data:`MAX_JOB_BYTES` of text
(a file, or one ``--set`` value), :data:`MAX_NODES` values and :data:`MAX_TEXT` characters of
scalars with every alias expanded (file and ``--set`` values together), :data:`MAX_DEPTH` levels of
nesting, :data:`MAX_NUMBER_CHARS` characters per number. An alias bomb, a deep nesting or a huge file
is refused in one line naming the key, in a fraction of a second; nothing expanded is ever built.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ngd_dist.service.jobs.errors import JobError, clip, show
from ngd_dist.service.jobs.schema import Job, job_from_dict, job_to_dict

_MERGE_TAG = "tag:yaml.org,2002:merge"

MAX_JOB_BYTES = 1 << 20
"""Largest job file read, and longest ``--set`` value: 1 MiB."""
MAX_NODES = 10_000
"""Most values in one job (its file and every ``--set`` value together): scalars, lists and
mappings, keys included, each alias counted as the whole value it repeats."""
MAX_TEXT = MAX_JOB_BYTES
"""Most characters of scalars in one job, each alias counted as the whole value it repeats."""
MAX_DEPTH = 64
"""Most lists and mappings nested in one another, the job's top-level mapping included."""
MAX_NUMBER_CHARS = 100
"""Longest number (an int of thousands of digits takes quadratic time to convert)."""


class Budget:
    """What the YAML documents of one job (its file, then each ``--set`` value) used so far of
    :data:`MAX_NODES` and :data:`MAX_TEXT`.
    """

    def __init__(self) -> None:
        self.nodes = 0
        """Values read so far, aliases expanded."""
        self.text = 0
        """Characters of scalars read so far, aliases expanded."""


@dataclass(frozen=True)
class _Shape:
    """A composed node with its aliases expanded: how many values and characters, how deep."""

    nodes: int
    text: int
    depth: int
    """Lists and mappings nested in it, itself included (0 for a scalar)."""


class _Refused(yaml.MarkedYAMLError):
    """A limit reached while composing: ``path`` is the key path at fault."""

    def __init__(self, problem: str, mark: yaml.Mark | None, path: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.path = path


def _join(path: Sequence[str]) -> str:
    """``["model", "args", "[3]"]`` -> ``"model.args[3]"``."""
    return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(path))


class JobLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a number (YAML 1.2), rejects duplicate keys, and
    enforces the limits of a job while composing (before any value is built).

    Plain PyYAML (YAML 1.1) reads ``1e-3`` and ``1.0e3`` as strings, which would turn the most
    common way of writing a damping or learning rate into a type error. ``budget`` is shared by the
    documents of one job; ``prefix`` is the key path the document sits at (an override's key), whose
    mappings count towards :data:`MAX_DEPTH`.
    """

    def __init__(self, stream: str, *, budget: Budget | None = None, prefix: Sequence[str] = ()) -> None:
        super().__init__(stream)
        self.budget = budget if budget is not None else Budget()
        self._path: list[str] = list(prefix)
        self._open = len(prefix)
        """Lists and mappings open around the node being composed."""
        self._shapes: dict[int, _Shape] = {}
        """Each composed node's shape, by ``id`` (the nodes live as long as the loader)."""
        self._paths: dict[int, str] = {}
        """The key path of each composed scalar, by ``id``, for the errors of the constructor."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose one node, counting it (an alias at the size of what it repeats) against the limits."""
        if isinstance(parent, yaml.SequenceNode):
            self._path.append(f"[{index}]")
        elif isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.ScalarNode):
            self._path.append(clip(str(index.value), 40))
        else:  # the document, or a mapping's key: at the path of what holds it
            self._path.append("")
        try:
            return self._compose_counted(parent, index)
        finally:
            self._path.pop()

    def _where(self) -> str:
        return clip(_join([p for p in self._path if p]), 200)

    def _compose_counted(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is the composer's own error
                shape = self._shapes.get(id(target))
                if shape is None:
                    name = clip(str(event.anchor), 40)
                    raise _Refused(
                        f"alias *{name} is used inside its own anchor &{name} (a recursive value); "
                        "expected a value that ends",
                        event.start_mark,
                        self._where(),
                    )
                self._count(shape, event.start_mark)
            return super().compose_node(parent, index)
        collection = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if collection:
            self._count(_Shape(1, 0, 1), event.start_mark)
            self._open += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._open -= 1
        if collection:
            mapping = isinstance(node, yaml.MappingNode)
            children = [c for pair in node.value for c in pair] if mapping else node.value
            shapes = [self._shapes[id(c)] for c in children]
            nodes, text = 1 + sum(s.nodes for s in shapes), sum(s.text for s in shapes)
            shape = _Shape(nodes, text, 1 + max((s.depth for s in shapes), default=0))
        else:
            shape = _Shape(1, len(node.value), 0)
            self._count(shape, event.start_mark)
            self._paths[id(node)] = self._where()
        self._shapes[id(node)] = shape
        return node

    def _count(self, shape: _Shape, mark: yaml.Mark | None) -> None:
        """Add a value (with everything an alias repeats) to the budget; _Refused past a limit."""
        budget = self.budget
        budget.nodes += shape.nodes
        budget.text += shape.text
        if budget.nodes > MAX_NODES:
            problem = f"more than {MAX_NODES} values with aliases expanded; expected at most {MAX_NODES}"
        elif budget.text > MAX_TEXT:
            problem = f"more than {MAX_TEXT} characters with aliases expanded; expected at most {MAX_TEXT}"
        elif self._open + shape.depth > MAX_DEPTH:
            problem = f"lists and mappings nested more than {MAX_DEPTH} deep; expected at most {MAX_DEPTH}"
        else:
            return
        raise _Refused(f"{problem} (a job holds settings, not data)", mark, self._where())

    def _check_number(self, node: yaml.ScalarNode) -> None:
        if len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(
                f"a number of {len(node.value)} characters; expected at most {MAX_NUMBER_CHARS}",
                node.start_mark,
                self._paths.get(id(node), ""),
            )

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An int, refused when longer than :data:`MAX_NUMBER_CHARS`."""
        self._check_number(node)
        value: int = super().construct_yaml_int(node)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        """A float, refused when longer than :data:`MAX_NUMBER_CHARS`."""
        self._check_number(node)
        value: float = super().construct_yaml_float(node)
        return value

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
                    f"duplicate key {show(key)} (first written on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
JobLoader.add_constructor("tag:yaml.org,2002:int", JobLoader.construct_yaml_int)
JobLoader.add_constructor("tag:yaml.org,2002:float", JobLoader.construct_yaml_float)


def _at(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: ``line L, column C: problem``."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = clip(err.problem or err.context or "invalid YAML", 300)
        where = f"{_at(mark)}: " if mark is not None else ""
        context = f" ({clip(err.context, 200)})" if err.context and err.problem else ""
        return f"invalid YAML at {where}{problem}{context}"
    return f"invalid YAML: {clip(str(err), 300)}"


def parse_yaml(
    text: str, source: str = "<string>", *, budget: Budget | None = None, prefix: Sequence[str] = ()
) -> Any:
    """Parse YAML text safely (no Python objects) and within the limits of a job.

    JobError naming ``source`` and the line on a syntax error, and the key path too past a limit.
    ``budget`` is shared by the documents of one job (its file and ``--set`` values); ``prefix`` is
    the key path the text is the value of.
    """
    if len(text) > MAX_JOB_BYTES:
        raise JobError(f"{len(text)} characters; expected at most {MAX_JOB_BYTES}", source=source)
    loader = JobLoader(text, budget=budget, prefix=prefix)
    try:
        return loader.get_single_data()  # JobLoader is a SafeLoader: no Python objects
    except _Refused as err:
        where = f"{err.path}: " if err.path else ""
        message = f"{where}{err.problem} ({_at(err.problem_mark)})"
        raise JobError(message, path=err.path, source=source) from None
    except yaml.YAMLError as err:
        raise JobError(_yaml_problem(err), source=source) from None
    finally:
        loader.dispose()


def read_job_file(path: str | Path, *, budget: Budget | None = None) -> dict[str, Any]:
    """The mapping in a job file (an empty file is an empty mapping: every default).

    At most :data:`MAX_JOB_BYTES` are read: a larger file, or one that is not a regular file (a
    device or a pipe, which could be endless), is refused before it is parsed.
    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        reason = "does not exist"
        if file.is_dir():
            reason = "is a directory"
        elif file.exists():
            reason = "is not a regular file (a device, pipe or socket); expected a YAML file"
        raise JobError(f"job file {source!r} {reason}")
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_JOB_BYTES + 1)
            size = max(len(raw), file.stat().st_size)
        if size > MAX_JOB_BYTES:
            raise JobError(
                f"job file {source!r} is {size} bytes; expected at most {MAX_JOB_BYTES} bytes (1 MiB): a job "
                "holds settings; data goes in files that data.args names"
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(f"cannot read job file {source!r}: {clip(str(err), 200)}") from None
    data = parse_yaml(text, source, budget=budget)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise JobError.invalid("", data, "a mapping of sections (model, data, batch, ...)").with_source(
            source
        )
    return dict(data)


def _split_override(text: str) -> tuple[list[str], str]:
    """``"optimizer.lr=0.5"`` -> ``(["optimizer", "lr"], "0.5")``; JobError unless ``KEY.PATH=VALUE``."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts):
        raise JobError(f"--set {show(text)}: expected KEY.PATH=VALUE, e.g. optimizer.lr=0.05")
    if len(parts) > MAX_DEPTH:
        raise JobError(
            f"--set {show(text)}: a key path of {len(parts)} keys; expected at most {MAX_DEPTH} (nesting)"
        )
    return parts, raw


def parse_override(text: str, *, budget: Budget | None = None) -> tuple[list[str], Any]:
    """``"optimizer.lr=0.5"`` -> ``(["optimizer", "lr"], 0.5)``; the value is read as YAML.

    The value counts towards ``budget`` (the limits of the job it overrides) and nests below its key.
    """
    parts, raw = _split_override(text)
    try:
        value = parse_yaml(raw, "--set", budget=budget, prefix=parts)
    except JobError as err:
        if err.path:  # a limit, at a key path: name the key first, then the override
            raise JobError(f"{err.detail} (set by --set {clip(text, 60)})", path=err.path) from None
        raise JobError(f"--set {show(text)}: {err.detail}") from None
    return parts, value


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str], *, budget: Budget | None = None
) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``"a.b=value"`` set (missing mappings on the way are created).

    Setting a key replaces its value (``--set optimizer={name: adamw}`` replaces the section);
    whether the key exists is checked afterwards, by ``job_from_dict``. The values count towards
    ``budget``, the limits of the whole job.
    """
    out = copy.deepcopy(dict(data))
    budget = budget if budget is not None else Budget()
    for text in overrides:
        parts, value = parse_override(text, budget=budget)
        node: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, Mapping) and not isinstance(child, dict):
                child = node[part] = dict(child)
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise JobError(f"--set {show(text)}: {where} is {show(child)}, not a mapping", path=where)
            node = child
        node[parts[-1]] = value
    return out


def _blame(err: JobError, overrides: Sequence[str]) -> JobError:
    """Add ``(set by --set a.b=v)`` to an error about a key that an override set."""
    if not err.path:
        return err
    for text in reversed(overrides):
        key = ".".join(_split_override(text)[0])
        if err.path == key or err.path.startswith((key + ".", key + "[")) or key.startswith(err.path + "."):
            return err.with_note(f"set by --set {clip(text, 200)}")
    return err


EMPTY_JOB = (
    "the job file is empty (no keys, only comments or null): every key would take its default, an MLP "
    "on the embedded digits; write at least model and data, or pass --allow-defaults to run the defaults"
)
"""Why ``ngd-dist validate/train/launch`` refuse an empty job file unless given ``--allow-defaults``."""


def load_job(path: str | Path, overrides: Sequence[str] = (), *, allow_defaults: bool = True) -> Job:
    """Read the job file at ``path``, apply ``--set`` overrides (``"a.b=value"``, value as YAML), check it.

    Raises ``JobError`` with a one-line message (file, key path, value, what is allowed) on the
    first problem: missing or oversized file, YAML syntax, a limit of the module docstring, unknown
    key (with a "did you mean"), bad value; and with ``allow_defaults=False`` (the command line's
    default), a file that holds no keys (:data:`EMPTY_JOB`), whatever the overrides.
    """
    source = str(path)
    budget = Budget()
    written = read_job_file(path, budget=budget)
    if not written and not allow_defaults:
        raise JobError(EMPTY_JOB, source=source)
    data = apply_overrides(written, overrides, budget=budget)
    try:
        return job_from_dict(data, source)
    except JobError as err:
        raise _blame(err, overrides) from None


def job_to_yaml(job: Job) -> str:
    """The job as YAML text, every key written (what ``ngd-dist validate`` can print)."""
    return yaml.safe_dump(job_to_dict(job), sort_keys=False, default_flow_style=None)
