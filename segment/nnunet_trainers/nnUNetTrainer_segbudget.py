"""Short-budget nnU-Net trainers for CPU, found by nnU-Net through nnUNet_extTrainer=<this folder>.

nnU-Net copies __init__'s locals() by parameter name into the checkpoint, so the base signature is spelled
out exactly (``*args, **kwargs`` fails with KeyError: 'args'). The `paper` profile uses nnUNetTrainer itself
(1000 epochs x 250 iterations).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_segtiny(nnUNetTrainer):
    """Unit tests: 4 epochs x 12 train / 2 val iterations; checkpoint every epoch so a kill loses little."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 12
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1


class nnUNetTrainer_segdemo(nnUNetTrainer):
    """CPU demo (32x40x32 volumes, 2 cores): 10 epochs x 25 train / 5 val iterations, a few minutes."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
        self.save_every = 1
