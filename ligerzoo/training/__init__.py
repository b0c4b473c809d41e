"""Training: configuration, data, FSDP2 preparation, the loop, checkpoints and metrics."""

from ligerzoo.training.config import Config, load_config
from ligerzoo.training.loop import train

__all__ = ["Config", "load_config", "train"]
