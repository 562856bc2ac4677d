"""Operating the pipeline on a cluster: Ray job submission, scheduled retraining,
the champion/challenger step of the Model Registry, and run comparison.

Modules are imported by the CLI on demand; none of them talks to MLflow directly
(every MLflow call is in pipeline.runs).
"""
