"""Train a model: `torchrun --nproc_per_node N train.py [--config FILE] [--section.key value ...]`.

With no arguments, a small Llama learns a built-in corpus from scratch (CPU or GPU). See
ligerzoo/training/config.py for every setting and configs/ for real runs.
"""

import sys

from ligerzoo.training import load_config, train

if __name__ == "__main__":
    train(load_config(sys.argv[1:]))
