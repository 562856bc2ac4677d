"""Ray job entrypoint: `python jobs/train.py CONFIG [-o key=value ...]`.

Thin on purpose: everything lives in `pipeline`; this only gives `ray job submit`
(and `pipeline submit`) a script to run inside the cluster.
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
