"""The MLflow model a grid run logs: a pyfunc whose ``predict`` tokenizes.

Input: uint8 images [B, C, H, W] (a numpy array, or over REST ``{"inputs": [...]}`` nested lists);
output: int64 codes [B, h, w], the argmax of the posterior (what `pipeline encode` writes). The model
holds two artifacts, ``weights`` (a state_dict, loaded with ``weights_only=True``) and ``config``
(the run's resolved config.yaml), and the image shape in its ``model_config``.

It is logged as a model from code (`pipeline.runs.registry.log_tokenizer_model`): MLflow runs this
file to load it, so nothing is unpickled. Ways in::

    mlflow.pyfunc.load_model("models:/images-dvae@champion").predict(images)
    mlflow models serve -m models:/images-dvae@champion --env-manager local -p 5001

The one module outside `pipeline.runs` that imports mlflow: a pyfunc must subclass MLflow's
`PythonModel` and name itself with `set_model`, and it lives beside the `Tokenizer` it serves.
Nothing in the package imports it; MLflow executes it when it loads the model.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TokenizerModel(PythonModel):
    """uint8 images [B, C, H, W] -> int64 codes [B, h, w] through a `Tokenizer` built from the artifacts."""

    def load_context(self, context):
        from pipeline.tokens.tokenizer import Tokenizer

        config = context.model_config or {}
        self.tokenizer = Tokenizer.from_files(context.artifacts["weights"], context.artifacts["config"],
                                              tuple(config["image_shape"]),
                                              batch_size=int(config.get("batch_size", 256)))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        # MLflow has checked the input against the signature (uint8, [-1, C, H, W]) before this call
        return self.tokenizer.encode(np.asarray(model_input))


mlflow.models.set_model(TokenizerModel())
