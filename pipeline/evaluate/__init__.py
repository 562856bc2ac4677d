"""Evaluate: the figures of a trained model on a whole split, after training.

- `likelihood`: `pipeline evaluate RUN_ID`, a run's -ELBO, importance-sampled and (small code
  spaces) exact -log p(x) on a split, logged into the run;
- `tokenizer_report`: what a grid of K-way codes keeps of a split and at what rate (PSNR, SSIM,
  codes used, bits per token), for a grid model's run and for `pipeline bench tokenizer`.

Submodules are imported by name (``from pipeline.evaluate.likelihood import evaluate_run``);
importing this package imports nothing else.
"""
