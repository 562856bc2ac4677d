"""What `train.use_gpu: auto` and `train.precision: auto` become on the cluster a run starts on.

The driver resolves both before the MLflow run exists, so the run's params and config.yaml hold
what was used (a run trained on CPUs says `train.use_gpu: false`, not `auto`), and a resumed run
keeps the hardware its checkpoint was made with (an fp16 grad scaler's state, for one).

- use_gpu auto: one GPU per worker when the cluster has a GPU for each worker it must start
  (the lower bound of an elastic range); otherwise CPUs, with a line saying why when the cluster
  has some GPUs but too few.
- precision auto: bf16 where the workers' device supports it (an Ampere or newer GPU), fp32 on
  CPUs, where autocast to bf16 is usually slower than fp32 and fp16 is not a CPU format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from pipeline.config import RunConfig, TrainConfig


def precision_for(setting: str, device: torch.device) -> str:
    """The autocast precision ``setting`` means on ``device`` (explicit settings pass through)."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def gpus_wanted(train: TrainConfig, cluster_gpus: float) -> bool:
    """Whether workers take one GPU each: ``use_gpu`` as set, or for auto, a GPU for every worker."""
    if train.use_gpu != "auto":
        return bool(train.use_gpu)
    return cluster_gpus >= train.worker_counts.start and cluster_gpus > 0


def _gpu_precision(setting: str) -> str:
    """Ask a GPU of the cluster what ``setting`` means there (a one-GPU Ray task)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def on_a_gpu(setting: str) -> str:
        return precision_for(setting, torch.device("cuda"))

    return ray.get(on_a_gpu.remote(setting), timeout=300)


def resolve_hardware(config: RunConfig, cluster: Mapping[str, float], *,
                     gpu_precision: Callable[[str], str] = _gpu_precision,
                     say: Callable[[str], None] = print) -> RunConfig:
    """``config`` with ``train.use_gpu`` and ``train.precision`` resolved against ``cluster``
    (``ray.cluster_resources()``); unchanged when neither is auto."""
    train = config.train
    if train.use_gpu != "auto" and train.precision != "auto":
        return config
    gpus = float(cluster.get("GPU", 0))
    use_gpu = gpus_wanted(train, gpus)
    if train.use_gpu == "auto" and 0 < gpus < train.worker_counts.start:
        say(f"train.use_gpu=auto: the cluster has {gpus:g} GPU(s) for {train.worker_counts.start} workers; "
            "training on CPUs (set train.use_gpu=true to wait for GPUs)")
    if train.precision != "auto":
        precision = train.precision
    else:
        precision = gpu_precision("auto") if use_gpu else precision_for("auto", torch.device("cpu"))
    resolved = train.model_copy(update={"use_gpu": use_gpu, "precision": precision})
    return config.model_copy(update={"train": resolved})
