"""The run configuration's schema: its sections (data, model and its latent, train, tracking) as pydantic
models with their defaults, descriptions and cross-field checks, and RunConfig, the whole run.

Every section forbids unknown keys, so a typo (``train.epoch``) is an error that
names the key and lists the allowed ones instead of a silently ignored setting. The field
descriptions are the reference: `pipeline docs` writes docs/reference/config.md from them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config.keys import flatten
from pipeline.config.renamed import upgrade_keys


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the samples come from and how each is read, decoded and shuffled."""

    url: str = Field(description="Directory or fsspec URL holding manifest.json and the shards")
    image_size: list[int] | None = Field(
        None, description="[H, W] fed to the model (default: the stored size; required when stored sizes vary)"
    )
    channels: Literal[1, 3] | None = Field(None, description="1 (grey) or 3 (RGB), converted on read (default: as stored)")
    resize: Literal["center-crop", "random-crop", "border"] = Field(
        "center-crop", description="To image_size: scale to cover, then a center or (training) random crop; "
        "border: scale to fit inside, pad with black"
    )
    hflip: bool = Field(False, description="Training: flip each image left-right with probability 1/2")
    decode_workers: int = Field(
        1, ge=1, description="Threads decoding images inside each Ray worker (Pillow releases the GIL)"
    )
    shuffle_buffer: int = Field(1000, ge=0, description="Samples held in each worker's shuffle buffer (0 = no shuffle)")
    verify: bool = Field(False, description="Check each shard's sha256 against the manifest when it is read")
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="A damaged sample or shard: error (stop, naming the shard) or skip it (counted, logged)"
    )
    cache_dir: str | None = Field(None, description="Local folder caching remote shards across epochs (null: no cache)")
    cache_max_bytes: int = Field(10 * 2**30, ge=0, description="Size limit of cache_dir; least recently used evicted")
    read_retries: int = Field(5, ge=0, description="Retries of a transient read error (reset, timeout, 5xx) per request")
    retry_backoff_s: float = Field(0.2, ge=0, description="First retry's backoff; doubles per retry (max 5 s), jittered")
    prefetch_batches: int = Field(
        4, ge=0, description="Train batches each worker prepares ahead in a background thread (0: inline); "
        "same batches, same order"
    )
    partitions: int | None = Field(
        None, ge=1,
        description="Fixed split of each epoch's sample order into P streams (default: train.workers; for a range, "
        "the least common multiple of its counts). The samples of "
        "every global batch depend on P, not on the worker count: resuming on W workers needs W to divide P",
    )

    @model_validator(mode="after")
    def _image_size(self) -> "DataConfig":
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"data.image_size must be [H, W] with positive sides, got {self.image_size}")
        return self


class TauExponential(_Section):
    """The exponential temperature schedule (`model.latent.tau_schedule: exponential`): Jang's staircase
    tau = max(tau_min, tau0 * exp(-rate * t))."""

    rate: float = Field(3e-5, ge=0, description="r in tau = max(tau_min, tau0 * exp(-r * t))")
    every: int = Field(1000, ge=1, description="t is the global step rounded down to a multiple of this")


class TauCosine(_Section):
    """The cosine temperature schedule (`model.latent.tau_schedule: cosine`): DALL-E's anneal from tau0 to
    tau_min along a half cosine."""

    steps: int = Field(150_000, ge=1, description="Steps from tau0 to tau_min (then constant)")


class LatentConfig(_Section):
    """The latent variables z: their kind, size, prior and KL, the categorical sample's gradient estimator
    and the Gumbel-Softmax temperature schedule."""

    kind: Literal["categorical", "gaussian", "mixture"] = Field(
        "categorical", description="categorical: N variables of K classes (Gumbel-Softmax); gaussian: a diagonal "
        "Gaussian z; mixture: a categorical y of K components and a Gaussian z given y (GMVAE)"
    )
    variables: int = Field(
        20, ge=1, description="Categorical: number of variables N. Gaussian and mixture: latent dimension of z"
    )
    categories: int = Field(
        10, ge=2, description="Categorical: classes K per variable. Mixture: components K of y (ignored for gaussian)"
    )
    estimator: Literal["gumbel-softmax", "straight-through"] = Field(
        "gumbel-softmax", description="Categorical: the gradient estimator of a sampled code. gumbel-softmax: the "
        "relaxed sample forward and backward; straight-through: its one-hot argmax forward, the relaxed gradient "
        "backward"
    )
    straight_through_from_step: int | None = Field(
        None, ge=0, description="Categorical: gumbel-softmax before this global step, straight-through from it on "
        "(the decoder then trains on the one-hot codes it is evaluated on); default: never (see `estimator`)"
    )
    prior: Literal["uniform", "learned"] = Field(
        "uniform", description="Categorical/mixture prior over classes: uniform, or learned logits"
    )
    kl: Literal["analytic", "relaxed"] = Field(
        "analytic",
        description="Categorical KL: analytic (log K - H(q), discrete) or relaxed (Concrete MC estimate log q(z) - log p(z))",
    )
    prior_tau: float | None = Field(
        None, gt=0, description="Relaxed KL: temperature of the Concrete prior (default: the posterior temperature)"
    )
    tau0: float = Field(1.0, gt=0, description="Initial Gumbel-Softmax temperature")
    tau_min: float = Field(0.5, gt=0, description="Temperature floor")
    tau_schedule: Literal["exponential", "cosine"] = Field(
        "exponential", description="exponential: Jang's staircase max(tau_min, tau0 exp(-r t)) (tau_exponential); "
        "cosine: DALL-E's anneal from tau0 to tau_min over tau_cosine.steps"
    )
    mixture_posterior: Literal["marginal", "mean_field"] = Field(
        "marginal", description="Mixture: marginal = q(y|x) q(z|x,y), ELBO summed exactly over y (one decoder pass "
        "per component); mean_field = q(y|x) q(z|x) (one decoder pass)"
    )
    # the schedules' own settings, sections of their own (after every plain key: the reference lists them so)
    tau_exponential: TauExponential = Field(
        default_factory=TauExponential, description="The exponential schedule's settings"
    )
    tau_cosine: TauCosine = Field(default_factory=TauCosine, description="The cosine schedule's settings")

    @model_validator(mode="after")
    def _straight_through_switch(self) -> "LatentConfig":
        if self.straight_through_from_step is not None and self.kind != "categorical":
            raise ValueError(f"model.latent.straight_through_from_step applies to categorical latents, not {self.kind}")
        if self.straight_through_from_step is not None and self.estimator == "straight-through":
            raise ValueError("model.latent.estimator: straight-through is straight-through from the start: drop "
                             "straight_through_from_step")
        return self


GRID_ARCHES = ("resnet", "patch")  # architectures whose latent is a grid of categorical codes (a tokenizer)


class ModelConfig(_Section):
    """The encoder and decoder: architecture, widths and the likelihood p(x|z)."""

    arch: Literal["mlp", "conv", "resnet", "patch"] = Field(
        "mlp", description="mlp: fully connected; conv: conv stack, then the hidden widths; resnet: residual "
        "encoder/decoder producing a grid latent of (H/f)x(W/f) categorical variables (latent.variables is "
        "derived); patch: the same grid computed at the grid's resolution, each position reading its f x f "
        "cell's pixels beside learned context, decoded back to cells (models/patch.py)"
    )
    likelihood: Literal["bernoulli", "logistic", "causal-logistic", "logit-laplace", "gaussian"] = Field(
        "bernoulli", description="p(x|z): bernoulli (binary pixels, see model.binarize) or logistic (discretized "
        "logistic over the 256 levels of each 8-bit channel: RGB/grey images, bits/dim) or causal-logistic (the "
        "same, each pixel also conditioned on the pixels above and to its left and on its earlier channels by "
        "a small masked-convolution head: a PixelCNN-style decoder; reconstructions decode pixel by pixel) or "
        "logit-laplace "
        "(DALL-E's continuous density on pixels mapped into [0.1, 0.9]) or gaussian (fixed std "
        "model.gaussian_std on pixels in [0, 1]: the squared error that PSNR measures)"
    )
    binarize: Literal["dynamic", "threshold", "none"] = Field(
        "dynamic",
        description="bernoulli: the binary targets. dynamic: x ~ Bernoulli(pixel) every time a sample is seen; "
        "threshold: pixel > 0.5; none: grey levels as targets",
    )
    gaussian_std: float = Field(0.05, gt=0, description="gaussian: the std of the pixel noise (pixels in [0, 1])")
    activation: Literal["relu", "tanh"] = Field("relu", description="Nonlinearity of encoder and decoder (Burda et al.: tanh)")
    hidden: list[int] = Field(default_factory=lambda: [512, 256], description="Encoder widths; the decoder mirrors them")
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="conv: channels of the stride-2 conv layers (decoder mirrors them); "
        "resnet: the width of each of the log2(downsample) + 1 stages; patch: one width, of the context blocks"
    )
    downsample: Literal[2, 4, 8, 16] = Field(4, description="resnet (4, 8, 16), patch (also 2): the grid is (H/f) x "
                                             "(W/f) for f = downsample")
    blocks: int = Field(2, ge=1, description="resnet: residual blocks per stage; patch: context blocks of the "
                        "encoder and of the decoder")
    codebook_dim: int = Field(64, ge=1, description="resnet, patch: width d of the learned codebook embedding the "
                              "K classes (patch with code_init kmeans: at least C*f*f)")
    code_init: Literal["random", "data", "kmeans"] = Field(
        "random", description="resnet, patch: sets the encoder's code head from the first training images so "
        "that every code is in use and informative from step 0: data, each of the K codes the nearest-centre "
        "logit around one random grid position's features; kmeans, around the K centres of MiniBatchKMeans on "
        "all their positions (patch: also the decoder's codebook, so step 0 is the K-means quantizer of the "
        "cells); random: PyTorch's default initialisation"
    )
    code_init_spread: float = Field(
        5.0, gt=0, description="data, kmeans: the std across the K codes of a position's initial logits. Large: "
        "the posterior starts confident, so sampled codes are the nearest centre"
    )
    restart_dead_codes: bool = Field(
        False, description="resnet, patch: at every epoch's end, each code that no position of the first "
        "training images picks (argmax) takes over part of a busy code's positions, in the EMA and the "
        "optimizer's moments too (VQ-VAE's codebook restarts, as a k-means split): codes stay in use"
    )
    entropy_weight: float = Field(
        0.0, ge=0.0, description="resnet, patch: weight of the code entropy term N * (H(q) per position - H(q pooled "
        "over the batch)) added to the loss: confident positions spread over the whole codebook (MAGVIT-v2)"
    )
    latent: LatentConfig = Field(default_factory=LatentConfig, description="The latent variables (model.latent.*)")

    @property
    def is_grid(self) -> bool:
        """A grid of categorical codes (arch resnet or patch): an image tokenizer."""
        return self.arch in GRID_ARCHES

    @model_validator(mode="after")
    def _positive_widths(self) -> "ModelConfig":
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError("model.hidden must be a non-empty list of positive widths")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("model.channels must be a non-empty list of positive channel counts")
        return self

    @model_validator(mode="after")
    def _resnet_grid(self) -> "ModelConfig":
        # The grid latent is the categorical one (N = h*w positions); one width per resolution.
        if self.arch == "patch":
            if len(self.channels) != 1:
                raise ValueError(f"arch patch takes one width in model.channels (its context blocks), got {self.channels}")
            if self.latent.kind != "categorical":
                raise ValueError(f"arch patch needs model.latent.kind categorical (a grid), got {self.latent.kind}")
        elif self.arch == "resnet":
            if self.downsample == 2:
                raise ValueError("arch resnet takes model.downsample 4, 8 or 16 (patch also takes 2), got 2")
            stages = int(math.log2(self.downsample)) + 1
            if len(self.channels) != stages:
                raise ValueError(f"arch resnet with model.downsample={self.downsample} needs model.channels with "
                                 f"{stages} stage widths, got {self.channels}")
            if self.latent.kind != "categorical":
                raise ValueError(f"arch resnet needs model.latent.kind categorical (a grid), got {self.latent.kind}")
        elif self.code_init != "random" or self.entropy_weight or self.restart_dead_codes:
            raise ValueError(f"model.code_init: {self.code_init}, model.entropy_weight: {self.entropy_weight} and "
                             f"model.restart_dead_codes: {self.restart_dead_codes} apply to a grid (arch resnet or "
                             f"patch), not arch {self.arch}")
        return self


class TrainConfig(_Section):
    """Ray Train workers, optimizer and schedules, checkpoints and fault tolerance."""

    epochs: int = Field(10, ge=1, description="Passes over the train split")
    batch_size: int = Field(100, ge=1, description="Global batch: split evenly across train.workers")
    workers: int = Field(
        2, ge=1, description="Ray Train workers (DDP ranks). A range MIN..MAX (e.g. 1..4) trains elastically: "
        "it starts with what the cluster can place and, after losing a node, goes on with fewer (at least MIN)"
    )
    min_workers: int | None = Field(
        None, ge=1, description="Elastic training's lower bound (set by train.workers=MIN..MAX; null: fixed size)"
    )
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each worker; also its torch threads (the integer part, at least 1)"
    )
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="One GPU per worker (Ray Train's use_gpu). auto: GPUs when the cluster has one for each "
        "worker, else CPUs; the run's params and config.yaml record what was used"
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (the schedule's start, after any warm-up)")
    lr_schedule: Literal["constant", "exponential", "cosine"] = Field(
        "constant", description="constant; exponential: lr * lr_decay_rate^(step // lr_decay_every) (Jang's "
        "notebook: 0.9 every 1000); cosine: from lr to lr_min over the run's total steps. All after lr_warmup_steps"
    )
    encoder_lr_scale: float = Field(
        1.0, gt=0, le=1, description="The encoder's learning rate is the schedule's times this. A grid's code "
        "assignment amplifies small changes of the encoder's features (its logits are distances to K centres): "
        "at the full rate the first updates move every position's features one way and onto a few codes"
    )
    lr_decay_rate: float = Field(0.9, gt=0, le=1, description="exponential: factor per lr_decay_every steps")
    lr_decay_every: int = Field(1000, ge=1, description="exponential: steps between decays")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to lr over this many steps")
    lr_min: float = Field(0.0, ge=0, description="Floor of the exponential and cosine schedules")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="adam (weight_decay = L2) or adamw (decoupled)")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the optimizer (see optimizer; 0: none)")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this (null: off)")
    ema: float | None = Field(
        None, gt=0, lt=1, description="Decay of an exponential moving average of the weights, used for validation "
        "and the logged model (null: off)"
    )
    kl_weight: float = Field(1.0, ge=0, description="beta in loss = recon + beta * KL (after the warm-up)")
    kl_warmup_steps: int = Field(0, ge=0, description="beta rises from 0 to kl_weight over this many steps")
    kl_warmup: Literal["linear", "cosine"] = Field("linear", description="Shape of the beta warm-up")
    kl_y_anneal_from: float = Field(
        10.0, ge=1, description="Mixture: initial weight of KL(q(y|x) || p(y)), falling linearly to 1 over "
        "kl_y_anneal_steps (deterministic annealing against the collapse onto one component)"
    )
    kl_y_anneal_steps: int = Field(0, ge=0, description="Mixture: steps of the KL(y) annealing (0: off, the plain ELBO)")
    seed: int = Field(0, description="Seeds the initial weights, shard order, shuffling, dynamic binarization and sampling noise")
    log_every: int = Field(20, ge=1, description="Log train/* metrics every this many steps")
    storage: str | None = Field(None, description="Ray Train storage_path for checkpoints (default: ./ray_results)")
    init_from: str | None = Field(None, description="Warm start: initial weights from a logged model (models:/NAME/VERSION, runs:/ID/model)")
    placement: Literal["auto", "spread", "pack"] = Field(
        "auto", description="Worker placement across nodes: spread (CPU default), pack (GPU default)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision of forward/backward (fp16 adds a gradient scaler). auto: bf16 on "
        "GPUs that support it, fp32 on CPUs; the run's params and config.yaml record what was used"
    )
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited)")
    checkpoint_every_steps: int = Field(0, ge=0, description="Also checkpoint every this many steps (0: epoch ends only)")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage (the newest)")
    on_nonfinite: Literal["stop", "skip_batch"] = Field(
        "stop", description="NaN/inf loss or gradient: stop (run FAILED) or skip that batch's update (counted)"
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_testing_aids(cls, values: Any) -> Any:
        """train.sample_log and train.debug_nan_step were testing aids in the user's schema (now hooks
        the tests install, pipeline/train/hooks.py): a config logged with them unset still loads (`pipeline train --resume` of an older run); set, they are refused as unknown."""
        if isinstance(values, dict) and values.get("sample_log") is None and values.get("debug_nan_step") is None:
            values = {k: v for k, v in values.items() if k not in ("sample_log", "debug_nan_step")}
        return values

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, values: Any) -> Any:
        """`workers: 1..4` -> workers=4, min_workers=1 (both logged as plain MLflow params)."""
        if isinstance(values, dict) and isinstance(values.get("workers"), str) and ".." in values["workers"]:
            low, _, high = values["workers"].partition("..")
            try:
                values = {**values, "min_workers": int(low), "workers": int(high)}
            except ValueError:
                raise ValueError(f"train.workers={values['workers']!r}: expected a count (4) or a range MIN..MAX (1..4)")
        return values

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"train.workers range {self.min_workers}..{self.workers}: MIN must not exceed MAX")
        for count in self.worker_counts:
            if self.batch_size % count:
                raise ValueError(
                    f"train.batch_size={self.batch_size} must be a multiple of train.workers={count} "
                    "(each worker takes an equal share of the global batch)"
                )
        return self

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may have: just `workers`, or MIN..MAX when elastic."""
        return range(self.min_workers or self.workers, self.workers + 1)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers


class TrackingConfig(_Section):
    """Where the run is recorded in MLflow, and whether its model is registered."""

    experiment: str = Field("pipeline", description="MLflow experiment the run is logged under")
    uri: str | None = Field(
        None, description="MLflow tracking URI, used unless --tracking-uri or $MLFLOW_TRACKING_URI is given "
        "(null: sqlite:///mlflow.db in the working directory)"
    )
    run_name: str | None = Field(None, description="MLflow run name; default <dataset>-<latent>-<UTC time>")
    register_model: bool = Field(True, description="Register the model and decide on the 'champion' alias after training")
    registered_model: str | None = Field(None, description="Model Registry name; default: the experiment name")


class RunConfig(_Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: Any) -> Any:
        """A tree that still names renamed keys (a run's logged config.yaml) reads them at their new places."""
        return upgrade_keys(values) if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _partitions_fit(self) -> "RunConfig":
        partitions = self.partitions
        counts = self.train.worker_counts
        if any(partitions % count for count in counts) or self.train.batch_size % partitions:
            workers = f"{counts.start}..{counts.stop - 1}" if len(counts) > 1 else str(self.train.workers)
            raise ValueError(
                f"data.partitions={partitions} must be a multiple of every worker count in train.workers={workers} "
                f"and divide train.batch_size={self.train.batch_size}"
            )
        return self

    @property
    def partitions(self) -> int:
        """P; by default the least common multiple of the worker counts (just `workers` unless elastic)."""
        return self.data.partitions or math.lcm(*self.train.worker_counts)

    def flat(self) -> dict[str, Any]:
        """The config as {"train.epochs": 10, ...}: MLflow params and the CLI's override keys."""
        return flatten(self.model_dump())
