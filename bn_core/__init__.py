"""BatchNorm Lab's training core: no UI code, usable from notebooks, the CLI and tests."""

from bn_core.batchnorm import BatchNorm, batch_norm_train

__all__ = ["BatchNorm", "batch_norm_train"]
