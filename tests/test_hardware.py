"""train.use_gpu: auto and train.precision: auto, resolved against the cluster a run starts on
(the CLI run in tests/test_images_train.py checks that a run's params hold the resolved values)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.train.hardware import precision_for, resolve_hardware
from pipeline.train.step import PrecisionStep


def _config(*overrides: str):
    return parse_config({"data": {"url": "data/digits"}}, list(overrides))


class _AskedGPU:
    """Stands in for the one-GPU Ray task: answers as a bf16-capable GPU and counts the questions."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, setting: str) -> str:
        self.asked.append(setting)
        return "bf16"


def test_auto_is_the_default_and_means_cpus_and_fp32_on_a_cluster_without_gpus() -> None:
    config = _config()
    assert (config.train.use_gpu, config.train.precision) == ("auto", "auto")
    gpu, notes = _AskedGPU(), []
    resolved = resolve_hardware(config, {"CPU": 2.0}, gpu_precision=gpu, say=notes.append)
    assert (resolved.train.use_gpu, resolved.train.precision) == (False, "fp32")
    assert resolved.flat()["train.use_gpu"] is False and resolved.flat()["train.precision"] == "fp32"
    assert gpu.asked == [] and notes == []
    assert config.train.use_gpu == "auto"  # the caller's config is left as it was


def test_auto_takes_a_gpu_per_worker_and_asks_a_gpu_for_its_precision() -> None:
    gpu = _AskedGPU()
    resolved = resolve_hardware(_config("train.workers=2"), {"CPU": 16.0, "GPU": 2.0}, gpu_precision=gpu)
    assert (resolved.train.use_gpu, resolved.train.precision) == (True, "bf16") and gpu.asked == ["auto"]
    # an elastic range needs GPUs for its lower bound only
    elastic = resolve_hardware(_config("train.workers=1..4", "train.batch_size=120"), {"GPU": 1.0}, gpu_precision=gpu)
    assert elastic.train.use_gpu is True


def test_too_few_gpus_train_on_cpus_and_say_so() -> None:
    notes: list[str] = []
    resolved = resolve_hardware(_config("train.workers=2"), {"CPU": 8.0, "GPU": 1.0}, gpu_precision=_AskedGPU(),
                                say=notes.append)
    assert (resolved.train.use_gpu, resolved.train.precision) == (False, "fp32")
    assert len(notes) == 1 and "1 GPU(s) for 2 workers" in notes[0] and "train.use_gpu=true" in notes[0]


def test_explicit_settings_are_kept() -> None:
    gpu = _AskedGPU()
    config = _config("train.use_gpu=false", "train.precision=bf16")
    assert resolve_hardware(config, {"GPU": 8.0}, gpu_precision=gpu) is config
    on_gpus = resolve_hardware(_config("train.use_gpu=true"), {}, gpu_precision=gpu)
    assert (on_gpus.train.use_gpu, on_gpus.train.precision) == (True, "bf16") and gpu.asked == ["auto"]
    fp16 = resolve_hardware(_config("train.precision=fp16"), {"GPU": 2.0}, gpu_precision=gpu)
    assert (fp16.train.use_gpu, fp16.train.precision) == (True, "fp16") and gpu.asked == ["auto"]


def test_precision_auto_on_a_device() -> None:
    assert precision_for("auto", torch.device("cpu")) == "fp32"
    assert [precision_for(p, torch.device("cpu")) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    # a config nobody resolved (a bench's plain loop) still builds its step
    step = PrecisionStep("auto", torch.device("cpu"))
    assert step.dtype is None and step.scaler is None


def test_a_sweep_sizes_its_trials_by_what_each_run_will_resolve(tmp_path) -> None:
    from pipeline.ops.sweep.driver import trial_resources
    from pipeline.ops.sweep.spec import build_spec

    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits-categorical.yaml")
    spec = build_spec(config, [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"], [0, 1], [])
    assert spec.trials[0].config.train.use_gpu == "auto"
    assert trial_resources(spec, cluster_gpus=0) == {"CPU": 2.0, "GPU": 0}  # auto on CPUs takes no GPU
    assert trial_resources(spec, cluster_gpus=4) == {"CPU": 2.0, "GPU": 2}
