"""`pipeline sweep`: a grid of settings x seeds, every trial a full training run, on Ray Tune.

Each trial is what `pipeline train` runs (`pipeline.train.trainer.train`: its own Ray Train
workers, checkpoints and fault tolerance), driven from a Ray Tune trial, and logs into its own
MLflow run: a child (tag ``mlflow.parentRunId``) of one parent run that records the sweep's
definition and, per grid point, the mean, standard deviation and n of each trial's final figures.

Identity and resumption live in MLflow, not in Tune's experiment state:

- the parent carries ``sweep.key``, a hash of the sweep's definition (resolved config, seeds,
  grid); running the same sweep again finds that parent and continues it (``fresh`` starts anew);
- each child carries ``sweep.trial_key``, a hash of its resolved config. A trial whose child is
  FINISHED (and evaluated, when asked) is reused, never run again; an unfinished child (its driver
  was killed) continues from its latest checkpoint as the same run (as `pipeline train --resume`);
- a trial that fails for good is tagged ``sweep.outcome=failed`` and not run again unless asked
  (driver.py says when, and how many trials run at once).

The package, by what each module owns:

- `spec`: the definition (seeds x grid points, each trial's config resolved, the sweep's and each
  trial's key);
- `trial`: one trial inside Ray Tune (train or continue its child run, evaluate it) and a trial's
  child run in MLflow;
- `driver`: `run_sweep`, the parent run, the Tune grid of the trials that need running, the outcomes;
- `results`: the outcomes, the aggregates per grid point, the parent's metrics and table, the summary.
"""
