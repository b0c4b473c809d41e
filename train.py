"""Train a model: `torchrun --nproc_per_node N train.py [--config FILE] [--section.key value ...]`.

With no arguments, a small Llama learns a built-in corpus from scratch (CPU or GPU). See
ligerzoo/training/config.py for every setting and configs/ for real runs.
"""

import os
import sys

from ligerzoo.training import load_config, train

if __name__ == "__main__":
    try:
        train(load_config(sys.argv[1:]))
    except (ValueError, OSError, FloatingPointError) as error:  # bad input: the message says what to do
        if os.environ.get("RANK", "0") == "0":  # every rank stops alike; one says why
            print(f"train.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
