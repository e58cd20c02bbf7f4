"""Short-budget nnU-Net trainers for CPU, found by nnU-Net through nnUNet_extTrainer=<this folder>.

nnU-Net copies __init__'s locals() by parameter name into the checkpoint, so the base signature is spelled
out exactly (``*args, **kwargs`` fails with KeyError: 'args'). The `paper` profile uses nnUNetTrainer itself
(1000 epochs x 250 iterations).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _BudgetTrainer(nnUNetTrainer):
    """Sets nnU-Net's budget from class attributes; subclasses only name their numbers."""

    EPOCHS = ITERATIONS = VAL_ITERATIONS = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS
        self.num_val_iterations_per_epoch = self.VAL_ITERATIONS
        self.save_every = 1  # checkpoint every epoch so a kill loses little


class nnUNetTrainer_segtiny(_BudgetTrainer):
    """Unit tests: 4 epochs x 12 train / 2 val iterations."""

    EPOCHS, ITERATIONS, VAL_ITERATIONS = 4, 12, 2


class nnUNetTrainer_segdemo(_BudgetTrainer):
    """CPU demo (32x40x32 volumes, 2 cores): 10 epochs x 25 train / 5 val iterations."""

    EPOCHS, ITERATIONS, VAL_ITERATIONS = 10, 25, 5
