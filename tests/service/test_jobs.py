"""YAML job descriptions: defaults, shipped configs, round trips, overrides, and one-line errors."""

import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ngd_dist import KFACConfig
from ngd_dist.kfac.config import Curvature, Method
from ngd_dist.service.jobs import (
    BatchSpec,
    Job,
    JobError,
    PrecisionSpec,
    apply_overrides,
    job_from_dict,
    job_to_dict,
    job_to_yaml,
    load_job,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides=()) -> JobError:
    with pytest.raises(JobError) as info:
        load_job(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert "\r" not in message, message
    return info.value


# --- defaults and shipped configs ------------------------------------------------------------------


def test_empty_file_is_all_defaults(tmp_path):
    job = load_job(write(tmp_path, ""))
    assert job == Job() == job_from_dict({})
    assert job.model.name == "mlp"
    assert job.data.name == "digits"
    assert job.batch == BatchSpec(per_rank=256, global_=None, accumulation=1)
    assert (job.train.steps, job.train.log_every, job.train.eval_every) == (100, 10, 0)
    assert (job.optimizer.name, job.optimizer.lr, job.optimizer.momentum) == ("sgd", 0.1, 0.9)
    assert job.optimizer.betas == (0.9, 0.999)
    assert (job.schedule.name, job.schedule.warmup_steps) == ("cosine", 0)
    assert job.preconditioner.enabled
    assert job.preconditioner.kfac == KFACConfig()
    assert job.preconditioner.kfac.curvature == "ief"
    assert job.precision == PrecisionSpec(dtype="float32", grad_scaler="auto")
    assert job.checkpoint.dir is None
    assert job.checkpoint.resume == "auto"
    assert (job.metrics.enabled, job.metrics.port) == (True, 9400)
    assert (job.distributed.backend, job.distributed.transport) == ("auto", "torch")
    assert (job.deepspeed.zero_stage, job.deepspeed.bf16) == (0, False)


def test_sections_may_be_null(tmp_path):
    assert load_job(write(tmp_path, "optimizer:\nmetrics: ~\n")) == Job()


def test_the_four_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "cifar_resnet", "gpt_lm", "gpu_large_batch"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_loads_and_says_how_to_run(path):
    job = load_job(path)
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#")
    assert f"ngd-dist launch configs/{path.name} --launcher torchrun --nproc 2" in header
    assert job_from_dict(job_to_dict(job)) == job
    assert isinstance(job.kfac_config(), KFACConfig)


def test_quickstart_config():
    job = load_job(CONFIGS / "quickstart.yaml")
    cfg = job.kfac_config()
    assert cfg is not None
    assert (cfg.curvature, cfg.damping, cfg.factor_every, cfg.inverse_every) == ("ief", 1e-3, 1, 5)
    assert cfg.output_module == "5"
    assert (job.model.name, job.data.name) == ("mlp", "digits")
    assert (job.optimizer.name, job.optimizer.lr, job.optimizer.momentum) == ("sgd", 0.1, 0.0)
    assert (job.batch.per_rank, job.train.steps) == (256, 1000)
    # long enough to watch and scrape: 10 progress lines, 5 evaluations on the held-out split
    assert (job.train.log_every, job.train.eval_every, job.data.holdout) == (100, 200, 0.1)
    assert (job.metrics.enabled, job.metrics.port) == (True, 9400)
    assert (job.checkpoint.dir, job.checkpoint.every, job.checkpoint.resume) == (
        "runs/quickstart",
        200,
        "auto",
    )
    assert job.batch.check_world(2) == 512


def test_large_batch_and_lm_configs():
    gpu = load_job(CONFIGS / "gpu_large_batch.yaml")
    assert gpu.optimizer.name in ("lars", "lamb")
    assert gpu.batch.per_rank == 1024
    assert gpu.precision.dtype == "bfloat16"
    assert gpu.precision.torch_dtype is torch.bfloat16
    assert gpu.distributed.backend == "nccl"
    assert not gpu.precision.use_grad_scaler
    lm = load_job(CONFIGS / "gpt_lm.yaml")
    assert lm.optimizer.name == "adamw"
    assert lm.model.name == "gpt"
    assert lm.kfac_config().layer_types == ("Linear", "Embedding")  # type: ignore[union-attr]
    assert lm.preconditioner.kfac.output_module == "head"
    cifar = load_job(CONFIGS / "cifar_resnet.yaml")
    assert (cifar.preconditioner.kfac.assignment, cifar.preconditioner.kfac.placement) == (
        "greedy",
        "memory",
    )
    assert (cifar.schedule.name, cifar.optimizer.momentum) == (
        "cosine",
        0.9,
    )
    assert cifar.schedule.warmup_steps > 0


# --- round trips -------------------------------------------------------------------------------------


def test_round_trip_through_yaml_text(tmp_path):
    job = load_job(
        CONFIGS / "gpu_large_batch.yaml",
        ["model.args.width=16", "preconditioner.include=['fc', 'layer1']", "batch.global=2048"],
    )
    data = job_to_dict(job)
    assert data["batch"]["global"] == 2048
    assert "global_" not in data["batch"]
    assert job_from_dict(data) == job
    again = load_job(write(tmp_path, job_to_yaml(job)))
    assert again == job
    assert yaml.safe_load(job_to_yaml(job)) == data


MC_JOB = "preconditioner: {curvature: mc, method: inverse, comm_dtype: bf16, include: [fc]}\n"


def test_preconditioner_holds_a_resolved_kfac_config(tmp_path):
    job = load_job(write(tmp_path, MC_JOB))
    kfac = job.preconditioner.kfac
    assert isinstance(kfac, KFACConfig)
    assert (kfac.curvature, kfac.method, kfac.comm_dtype, kfac.include) == (
        Curvature.MC,
        Method.INVERSE,
        torch.bfloat16,
        ("fc",),
    )
    config = job.kfac_config()
    assert config == kfac
    config.output_module = "head"  # the caller's copy: the job keeps its own
    assert job.preconditioner.kfac.output_module is None


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_job_to_dict_writes_plain_yaml_values(tmp_path):
    job = load_job(write(tmp_path, MC_JOB))
    data = job_to_dict(job)
    pre = data["preconditioner"]
    assert (pre["curvature"], pre["method"], pre["comm_dtype"], pre["include"]) == ("mc", "inverse", "bfloat16", ["fc"])
    leaves = list(_leaves(data))
    assert len(leaves) > 50
    assert {type(v) for v in leaves} <= {str, int, float, bool, type(None)}
    assert job_from_dict(data) == job


def _every_key():
    for name, value in job_to_dict(Job()).items():
        if isinstance(value, dict):
            yield from (f"{name}.{key}" for key in value)
        else:
            yield name


@pytest.mark.parametrize("key", list(_every_key()))
def test_every_key_is_checked(key):
    """A value no key accepts is rejected, naming the key: every declared field carries a check."""
    with pytest.raises(JobError) as info:
        job_from_dict(apply_overrides({}, [f"{key}=[[]]"]))
    assert info.value.path == key
    assert f"{key}: got [[]]" in str(info.value)


def test_resolved_preconditioner_inherits_seed_and_transport(tmp_path):
    job = load_job(write(tmp_path, "seed: 7\ndistributed: {transport: mpi}\n"))
    cfg = job.kfac_config()
    assert cfg is not None
    assert (cfg.seed, cfg.transport) == (7, "mpi")
    assert load_job(write(tmp_path, "preconditioner: {seed: 3}\nseed: 7\n")).preconditioner.kfac.seed == 3
    assert load_job(write(tmp_path, "preconditioner: {enabled: false}\n")).kfac_config() is None


def test_dtype_aliases_and_scientific_notation(tmp_path):
    job = load_job(write(tmp_path, "precision: {dtype: fp16}\noptimizer: {lr: 1e-3}\n"))
    assert job.precision.dtype == "float16"
    assert job.precision.use_grad_scaler
    assert job.optimizer.lr == 1e-3
    off = load_job(write(tmp_path, "precision: {dtype: bf16, grad_scaler: false}\n")).precision
    assert off.autocast
    assert not off.use_grad_scaler
    bf16 = load_job(write(tmp_path, "preconditioner: {factor_dtype: bf16}\n"))
    assert bf16.preconditioner.kfac.factor_dtype is torch.bfloat16
    assert job_to_dict(bf16)["preconditioner"]["factor_dtype"] == "bfloat16"


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides(tmp_path):
    path = CONFIGS / "quickstart.yaml"
    job = load_job(
        path,
        [
            "optimizer.lr=0.5",
            "preconditioner.curvature=ef",
            "model.args.depth=3",
            "data.args={path: /tmp/x.pt, extra: [1, 2]}",
            "optimizer.betas=[0.8, 0.9]",
            "checkpoint.dir=null",
            "checkpoint.every=0",
            "batch.global=1024",
        ],
    )
    assert job.optimizer.lr == 0.5
    assert job.kfac_config().curvature == "ef"
    assert job.model.args == {"in_features": 64, "hidden": 128, "classes": 10, "depth": 3}
    assert job.data.args == {"path": "/tmp/x.pt", "extra": [1, 2]}
    assert job.optimizer.betas == (0.8, 0.9)
    assert job.checkpoint.dir is None
    assert job.batch.global_ == 1024
    assert job.batch.world_size == 4
    assert load_job(path).optimizer.lr == 0.1  # the file itself is untouched
    fresh = load_job(write(tmp_path, "seed: 1\n"), ["deepspeed.bf16=true", "precision.dtype=bfloat16"])
    assert fresh.deepspeed.bf16


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lr_rate=0.5", "did you mean 'lr'?"),
        ("optimiser.lr=0.5", "did you mean 'optimizer'?"),
        ("preconditioner.curvture=ef", "did you mean 'curvature'?"),
        ("optimizer.lr=-1", "optimizer.lr: got -1"),
        ("optimizer.lr", "expected KEY.PATH=VALUE"),
        ("=3", "expected KEY.PATH=VALUE"),
        ("optimizer.lr.x=1", "optimizer.lr is 0.1, not a mapping"),
        ("optimizer.lr=[", "invalid YAML"),
    ],
)
def test_bad_overrides(override, needle):
    err = error_of(CONFIGS / "quickstart.yaml", [override])
    assert needle in str(err)
    if "got" in needle or "did you mean" in needle:
        assert f"set by --set {override}" in str(err)


# --- malformed files ---------------------------------------------------------------------------------

BAD = [
    # (id, yaml text, key path named, fragment of the message)
    ("unknown-top", "optimiser: {lr: 0.1}", "optimiser", "did you mean 'optimizer'?"),
    ("unknown-optimizer-key", "optimizer: {lr_rate: 0.1}", "optimizer.lr_rate", "did you mean 'lr'?"),
    ("unknown-schedule-key", "schedule: {warmup: 5}", "schedule.warmup", "did you mean 'warmup_steps'?"),
    ("unknown-batch-key", "batch: {per_rnak: 8}", "batch.per_rnak", "did you mean 'per_rank'?"),
    (
        "unknown-kfac-field",
        "preconditioner: {dampng: 0.1}",
        "preconditioner.dampng",
        "did you mean 'damping'?",
    ),
    ("unknown-metrics-key", "metrics: {prot: 9000}", "metrics.prot", "did you mean 'port'?"),
    ("section-not-mapping", "optimizer: sgd", "optimizer", "expected a mapping"),
    ("lr-string", "optimizer: {lr: '0.1'}", "optimizer.lr", "got '0.1'; expected a finite number > 0"),
    ("lr-zero", "optimizer: {lr: 0}", "optimizer.lr", "> 0"),
    ("lr-negative", "optimizer: {lr: -0.1}", "optimizer.lr", "> 0"),
    ("lr-nan", "optimizer: {lr: .nan}", "optimizer.lr", "got nan"),
    ("lr-inf", "optimizer: {lr: .inf}", "optimizer.lr", "finite"),
    ("lr-bool", "optimizer: {lr: true}", "optimizer.lr", "got True"),
    ("momentum-one", "optimizer: {momentum: 1.0}", "optimizer.momentum", "in [0, 1)"),
    ("momentum-negative", "optimizer: {momentum: -0.5}", "optimizer.momentum", "in [0, 1)"),
    ("betas-out", "optimizer: {name: adamw, betas: [0.9, 1.0]}", "optimizer.betas[1]", "in [0, 1)"),
    ("betas-length", "optimizer: {betas: [0.9]}", "optimizer.betas", "two numbers"),
    ("optimizer-name", "optimizer: {name: adam}", "optimizer.name", "did you mean 'adamw'?"),
    ("eps-zero", "optimizer: {name: adamw, eps: 0}", "optimizer.eps", "> 0"),
    ("steps-float", "train: {steps: 10.5}", "train.steps", "an integer >= 1"),
    ("steps-zero", "train: {steps: 0}", "train.steps", "an integer >= 1"),
    ("steps-bool", "train: {steps: true}", "train.steps", "got True"),
    ("steps-string", "train: {steps: ten}", "train.steps", "got 'ten'"),
    ("log-every-zero", "train: {log_every: 0}", "train.log_every", ">= 1"),
    ("seed-negative", "seed: -1", "seed", "an integer >= 0"),
    ("name-spaces", "name: my job", "name", "letters, digits"),
    ("per-rank-zero", "batch: {per_rank: 0}", "batch.per_rank", ">= 1"),
    ("global-not-multiple", "batch: {per_rank: 64, global: 100}", "batch.global", "multiple of per_rank"),
    ("accumulation-bool", "batch: {accumulation: false}", "batch.accumulation", "got False"),
    (
        "warmup-too-long",
        "train: {steps: 10}\nschedule: {warmup_steps: 11}",
        "schedule.warmup_steps",
        "train.steps=10",
    ),
    ("warmup-negative", "schedule: {warmup_steps: -1}", "schedule.warmup_steps", ">= 0"),
    ("schedule-name", "schedule: {name: cosin}", "schedule.name", "did you mean 'cosine'?"),
    ("step-without-decay", "schedule: {name: step}", "schedule.decay_steps", "step schedule needs it"),
    ("min-lr-above-lr", "schedule: {min_lr: 1.0}", "schedule.min_lr", "optimizer.lr=0.1"),
    ("gamma-zero", "schedule: {name: step, decay_steps: 5, gamma: 0}", "schedule.gamma", "in (0, 1]"),
    ("model-name", "model: {name: resnet}", "model.name", "did you mean 'resnet18'?"),
    ("model-bad-factory", "model: {name: 'my-pkg:make'}", "model.name", "package.module:factory"),
    ("model-args-list", "model: {args: [1, 2]}", "model.args", "a mapping of keyword arguments"),
    ("data-name", "data: {name: cifar100}", "data.name", "one of digits"),
    ("data-name-no-attr", "data: {name: 'mypkg.data:'}", "data.name", "package.module:factory"),
    ("dtype", "precision: {dtype: float8}", "precision.dtype", "one of float32, bfloat16, float16"),
    ("grad-scaler", "precision: {grad_scaler: sometimes}", "precision.grad_scaler", "auto, true or false"),
    ("port-high", "metrics: {port: 70000}", "metrics.port", "[1, 65535]"),
    ("port-negative", "metrics: {port: -1}", "metrics.port", "[1, 65535]"),
    ("stall-zero", "metrics: {stall_seconds: 0}", "metrics.stall_seconds", "> 0"),
    ("metrics-enabled-string", "metrics: {enabled: 'yes please'}", "metrics.enabled", "true or false"),
    ("checkpoint-every-no-dir", "checkpoint: {every: 10}", "checkpoint.dir", "checkpoint.every=10"),
    ("checkpoint-keep-zero", "checkpoint: {dir: runs/x, keep: 0}", "checkpoint.keep", ">= 1"),
    ("checkpoint-resume-empty", "checkpoint: {resume: ''}", "checkpoint.resume", "auto, never"),
    ("backend", "distributed: {backend: mpi}", "distributed.backend", "one of auto, gloo, nccl"),
    ("transport", "distributed: {transport: nccl}", "distributed.transport", "one of torch, mpi"),
    ("timeout-nan", "distributed: {timeout_s: .nan}", "distributed.timeout_s", "finite"),
    ("zero-stage-2", "deepspeed: {zero_stage: 2}", "deepspeed.zero_stage", "partition gradients"),
    ("zero-stage-3", "deepspeed: {zero_stage: 3}", "deepspeed.zero_stage", "full reduced gradient"),
    ("zero-stage-9", "deepspeed: {zero_stage: 9}", "deepspeed.zero_stage", "[0, 3]"),
    ("ds-bf16-fp32", "deepspeed: {bf16: true}", "deepspeed.bf16", "precision.dtype is bfloat16"),
    ("kfac-damping", "preconditioner: {damping: -1.0e-3}", "preconditioner.damping", "got -0.001"),
    (
        "kfac-curvature",
        "preconditioner: {curvature: fisher}",
        "preconditioner.curvature",
        "one of ef, mc, ief",
    ),
    (
        "kfac-inverse-every",
        "preconditioner: {factor_every: 10, inverse_every: 15}",
        "preconditioner.inverse_every",
        "multiple",
    ),
    (
        "kfac-layer-types",
        "preconditioner: {layer_types: [Linear, Conv3d]}",
        "preconditioner.layer_types",
        "Linear, Conv2d",
    ),
    ("kfac-regex", "preconditioner: {include: ['[']}", "preconditioner.include", "regular expression"),
    (
        "kfac-transport-mismatch",
        "preconditioner: {transport: mpi}",
        "preconditioner.transport",
        "distributed.transport",
    ),
    (
        "kfac-refresh",
        "preconditioner: {refresh: sometimes}",
        "preconditioner.refresh",
        "one of fixed, adaptive",
    ),
    (
        "kfac-comm-dtype",
        "preconditioner: {comm_dtype: float16}",
        "preconditioner.comm_dtype",
        "one of float32, bfloat16",
    ),
    ("kfac-enabled-int", "preconditioner: {enabled: 1}", "preconditioner.enabled", "true or false"),
    ("top-level-list", "- a\n- b", "", "expected a mapping of sections"),
    ("top-level-scalar", "just words", "", "expected a mapping of sections"),
]


@pytest.mark.parametrize(("case", "text", "path", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_malformed_job(tmp_path, case, text, path, fragment):
    file = write(tmp_path, text + "\n")
    err = error_of(file)
    message = str(err)
    assert err.path == path
    assert message.startswith(f"{file}: ")
    if case.startswith("unknown"):  # "unknown key 'lr_rate' in optimizer; did you mean 'lr'?"
        section, _, key = path.rpartition(".")
        assert f"unknown key {key!r} {f'in {section}' if section else 'at the top level'};" in message
    elif path:
        assert f"{path}: got " in message
    assert fragment in message, message
    assert "KFACConfig" not in message


def test_kfac_error_is_relabelled(tmp_path):
    with pytest.raises(ValueError, match=r"^KFACConfig\.factor_every"):
        KFACConfig(factor_every=0)
    err = error_of(write(tmp_path, "preconditioner:\n  factor_every: 0\n"))
    assert err.path == "preconditioner.factor_every"
    assert str(err).endswith("preconditioner.factor_every: got 0; expected an integer >= 1")


def test_missing_file(tmp_path):
    err = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err)
    assert "does not exist" in str(err)
    assert "is a directory" in str(error_of(tmp_path))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    file = write(tmp_path, "seed: 1\noptimizer:\n  lr: 0.1\n   momentum: 0.9\n")
    message = str(error_of(file))
    assert message.startswith(f"{file}: invalid YAML at line 4")
    unclosed = str(error_of(write(tmp_path, "optimizer: {lr: 0.1\n", "b.yaml")))
    assert "invalid YAML" in unclosed
    assert "line" in unclosed


def test_duplicate_key_is_rejected(tmp_path):
    message = str(error_of(write(tmp_path, "optimizer:\n  lr: 0.1\n  lr: 0.2\n")))
    assert "duplicate key 'lr'" in message
    assert "line 3" in message


def test_python_objects_are_not_constructed(tmp_path):
    assert "invalid YAML" in str(error_of(write(tmp_path, "seed: !!python/object/apply:os.getcwd []\n")))


def test_job_from_dict_rejects_non_yaml_values():
    with pytest.raises(JobError, match=r"^<dict>: preconditioner.damping: .*schedules cannot be written"):
        job_from_dict({"preconditioner": {"damping": lambda step: 1e-3}})
    with pytest.raises(JobError, match=r"^cfg: model.args.fn: got"):
        job_from_dict({"model": {"args": {"fn": object()}}}, source="cfg")


def test_zero_stage_2_allowed_without_preconditioner():
    job = job_from_dict({"preconditioner": {"enabled": False}, "deepspeed": {"zero_stage": 2}})
    assert job.deepspeed.zero_stage == 2


# --- helpers of the trainer ---------------------------------------------------------------------------


def test_check_world():
    batch = BatchSpec(per_rank=32, global_=256, accumulation=2)
    assert batch.world_size == 4
    assert batch.check_world(4) == 256
    assert BatchSpec(per_rank=32).check_world(3) == 96
    with pytest.raises(JobError) as info:
        batch.check_world(2)
    assert info.value.path == "batch.global"
    assert "batch.global: got 256" in str(info.value)
    assert "32 x 2 x 2 = 128" in str(info.value)
    with pytest.raises(JobError):
        batch.check_world(0)


def test_job_lr_at_follows_its_schedule():
    job = job_from_dict({"train": {"steps": 20}, "optimizer": {"lr": 0.4}, "schedule": {"warmup_steps": 4}})
    assert job.lr_at(1) == pytest.approx(0.2)
    assert math.isclose(job.lr_at(3), 0.4)
    assert job.lr_at(19) < 0.01  # cosine down to min_lr=0 at train.steps
