"""Short-budget nnU-Net trainers for CPU, found by nnU-Net through nnUNet_extTrainer=<this folder>.

nnU-Net copies __init__'s locals() by parameter name into the checkpoint, so the base signature is spelled
out exactly (``*args, **kwargs`` fails with KeyError: 'args'). The numbers are segment.config.NNUNET_BUDGETS
(the one statement of them); the `paper` profile uses nnUNetTrainer itself (its own 1000 epochs x 250 iterations).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from segment.config import NNUNET_BUDGETS


class _BudgetTrainer(nnUNetTrainer):
    """Sets nnU-Net's budget from NNUNET_BUDGETS[PROFILE]; subclasses only name their profile."""

    PROFILE = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        budget = NNUNET_BUDGETS[self.PROFILE]
        self.num_epochs = budget["epochs"]
        self.num_iterations_per_epoch = budget["iters_per_epoch"]
        self.num_val_iterations_per_epoch = budget["val_iters_per_epoch"]
        self.save_every = 1  # checkpoint every epoch so a kill loses little


class nnUNetTrainer_segtiny(_BudgetTrainer):
    """Unit tests."""

    PROFILE = "tiny"


class nnUNetTrainer_segdemo(_BudgetTrainer):
    """CPU demo (32x40x32 volumes, 2 cores)."""

    PROFILE = "demo"
