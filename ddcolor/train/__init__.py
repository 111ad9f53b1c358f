"""Training: the DDColor GAN trainer, its checkpoints and multi-process (DDP) setup.

from ddcolor.train import train
result = train(cfg, "data/shards", out_dir="runs/x", init="official:ddcolor_paper_tiny")
result.checkpoint_path        # runs/x/model.safetensors
"""

from ddcolor.train.trainer import Trainer, TrainingDivergedError, TrainingStopped, TrainResult, train

__all__ = ["TrainResult", "Trainer", "TrainingDivergedError", "TrainingStopped", "train"]
