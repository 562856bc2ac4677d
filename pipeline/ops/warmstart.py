"""Warm start: initial weights for a retraining run from a logged model (the champion).

The hook for the per-worker loop, right after the model is built and only when no Ray
checkpoint is being restored (a restore must win over the warm start)::

    if cfg.train.init_from and not checkpoint:
        from pipeline.ops.warmstart import load_initial_weights
        load_initial_weights(model, cfg.train.init_from, args.tracking_uri)

Every rank may call it (DDP also broadcasts rank 0's weights when it wraps the model).
"""

from __future__ import annotations

import torch

from pipeline.ops import tracking


class WarmStartError(RuntimeError):
    """The model named by train.init_from cannot initialise this run's model."""


def initial_state_dict(init_from: str, tracking_uri: str) -> dict[str, torch.Tensor]:
    """The VAE weights of a logged model (models:/NAME/VERSION, models:/NAME@champion, runs:/ID/model)."""
    try:
        logged = tracking.load_pytorch_model(tracking_uri, init_from)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; say which URI failed
        raise WarmStartError(f"train.init_from={init_from}: cannot load the model: {err}") from err
    vae = getattr(logged, "vae", logged)  # the logged Reconstructor wraps the VAE
    return {k: v.detach().cpu() for k, v in vae.state_dict().items()}


def load_initial_weights(model: torch.nn.Module, init_from: str, tracking_uri: str) -> None:
    """Copy the logged model's weights into `model`, refusing a different architecture by name."""
    state = initial_state_dict(init_from, tracking_uri)
    own = model.state_dict()
    mismatched = sorted(k for k in own.keys() | state.keys()
                        if k not in own or k not in state or own[k].shape != state[k].shape)
    if mismatched:
        raise WarmStartError(f"train.init_from={init_from}: architecture differs from this config "
                             f"(parameters {', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''})")
    model.load_state_dict(state)
