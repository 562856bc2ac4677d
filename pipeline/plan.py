"""`pipeline plan`: a back-of-the-envelope capacity plan for a training run at scale.

Every figure is arithmetic on the inputs (measure them with `pipeline bench`), so a plan is
only as good as what it is fed. The model: each step a worker computes on its batch, then a
ring all-reduce exchanges the gradient; data streams from an object store in whole shards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PlanInputs:
    samples: int  # per epoch
    bytes_per_sample: float  # as stored in the shards
    workers: int
    samples_per_s_per_worker: float  # compute-bound throughput of one worker (pipeline bench train)
    batch_per_worker: int = 100
    params: int = 1_000_000  # model parameters (fp32 gradients are all-reduced)
    bandwidth_gbit_s: float = 10.0  # per worker, for the gradient all-reduce
    shard_mb: float = 256.0  # target shard size in the object store
    store_gbit_s_per_worker: float = 10.0  # what one worker can pull from the store


@dataclass(frozen=True)
class Plan:
    workers: int
    epoch_hours: float
    steps_per_epoch: int
    compute_ms_per_step: float
    allreduce_ms_per_step: float
    allreduce_frac: float
    samples_per_shard: int
    shards: int
    shards_per_worker: float
    store_requests_per_s: float
    store_gbit_s_total: float
    data_frac_of_store_link: float
    bottleneck: str


def plan(inputs: PlanInputs, workers: int | None = None) -> Plan:
    w = workers or inputs.workers
    samples_per_shard = max(1, int(inputs.shard_mb * 1e6 // inputs.bytes_per_sample))
    shards = -(-inputs.samples // samples_per_shard)
    global_batch = inputs.batch_per_worker * w
    steps = inputs.samples // global_batch
    compute_s = inputs.batch_per_worker / inputs.samples_per_s_per_worker
    # ring all-reduce: each worker sends and receives 2 (w-1)/w of the gradient bytes
    allreduce_s = 0.0 if w == 1 else 2 * (w - 1) / w * inputs.params * 4 * 8 / (inputs.bandwidth_gbit_s * 1e9)
    step_s = compute_s + allreduce_s  # no overlap assumed: an upper bound
    per_worker_samples_s = inputs.batch_per_worker / step_s
    per_worker_gbit_s = per_worker_samples_s * inputs.bytes_per_sample * 8 / 1e9
    data_frac = per_worker_gbit_s / inputs.store_gbit_s_per_worker
    shares = {"compute": compute_s, "all-reduce": allreduce_s, "data": data_frac * step_s}
    return Plan(
        workers=w,
        epoch_hours=steps * max(step_s, data_frac * step_s) / 3600,
        steps_per_epoch=steps,
        compute_ms_per_step=compute_s * 1e3,
        allreduce_ms_per_step=allreduce_s * 1e3,
        allreduce_frac=allreduce_s / step_s,
        samples_per_shard=samples_per_shard,
        shards=shards,
        shards_per_worker=shards / w,
        store_requests_per_s=w * per_worker_samples_s / samples_per_shard,
        store_gbit_s_total=w * per_worker_gbit_s,
        data_frac_of_store_link=data_frac,
        bottleneck=max(shares, key=shares.get),
    )


def scaling_table(inputs: PlanInputs) -> list[Plan]:
    """The plan at 1, 2, 4, ... workers up to the requested count: where the bottleneck moves."""
    counts, w = [], 1
    while w < inputs.workers:
        counts.append(w)
        w *= 2
    return [plan(inputs, c) for c in counts + [inputs.workers]]


def warnings_for(inputs: PlanInputs, result: Plan) -> list[str]:
    notes = []
    if result.shards_per_worker < 1:
        notes.append(f"only {result.shards} shards for {result.workers} workers: use smaller shards "
                     f"(--shard-mb) so every worker streams whole shards of its own")
    if result.shards_per_worker < 8:
        notes.append("fewer than 8 shards per worker: shuffling across shards is weak within an epoch")
    if result.data_frac_of_store_link > 0.5:
        notes.append("data needs more than half of each worker's store bandwidth: cache shards locally "
                     "(data.cache_dir) or compress them")
    if result.allreduce_frac > 0.3:
        notes.append("all-reduce takes over 30% of a step: raise the batch per worker or overlap communication")
    return notes


def as_dict(result: Plan) -> dict:
    return asdict(result)
