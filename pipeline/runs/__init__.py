"""Runs: the one owner of MLflow and of loading a run.

- `store`: the tracking URI, experiments, find / start / reopen / end a run, params, tags, the
  restart count, run search, metric histories, artifacts (every client call of a run's lifecycle);
- `logger`: rank 0's asynchronous `RunLogger` (exactly-once metrics, the fallback file, replay);
- `registry`: the logged model (a grid model as its tokenizer pyfunc), registered versions,
  aliases, the champion alias;
- `load`: a run or model URI -> its config, data target and VAE rebuilt with ``weights_only=True``
  (evaluate, tokens, export and warm start load through it);
- `export`: `pipeline export`, a run's model as a plain folder (safetensors weights, its config),
  and `load_exported`, the VAE back from such a folder without MLflow.

Nothing else in `pipeline` imports mlflow, except the tokenizer pyfunc MLflow itself executes
(`pipeline/tokens/serving.py`). Tracking URIs travel as arguments (``MlflowClient(uri)``); the
process-global store is touched only inside `store.fluent_store`, for the MLflow calls that read it.
Submodules are imported by name (``from pipeline.runs import store``); importing this package
imports neither mlflow nor torch.
"""
