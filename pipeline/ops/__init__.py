"""Operating the pipeline on a cluster: Ray job submission, scheduled retraining, the run policy
around training (retrain.py: naming, warm start, the champion/challenger step of the Model
Registry), sweeps on Ray Tune, and run comparison.

Modules are imported by the CLI (pipeline/cli/) on demand; none of them talks to MLflow directly
(every MLflow call is in pipeline.runs).
"""
