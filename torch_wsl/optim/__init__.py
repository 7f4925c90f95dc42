"""Drop-in fused optimizers: ``torch.optim.Adam``, ``AdamW`` and ``SGD`` with one
multi-tensor operator per parameter group and step (``torch.ops.torch_wsl.adam_``,
``adamw_``, ``sgd_``), the same constructor arguments, defaults and state_dict
format as torch.optim's, and sync-free ``torch.amp.GradScaler`` support."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
