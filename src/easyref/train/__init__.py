"""Training EasyRef: the three progressive stages, one entry point for a plain process, torchrun and a cluster.

* :mod:`~easyref.train.config`     -- :class:`TrainConfig` (one per stage, read from ``params.yaml``'s ``train:``)
* :mod:`~easyref.train.distributed` -- the torchrun environment, process group, DDP / FSDP2 wrapping
* :mod:`~easyref.train.data`       -- the sample interface, a resumable global data order, a folder dataset
* :mod:`~easyref.train.recipe`     -- frozen conditioning (VAE, text encoders), CFG drops, the epsilon-MSE loss
* :mod:`~easyref.train.checkpoint` -- atomic, resumable training checkpoints (safetensors + JSON, no pickles)
* :mod:`~easyref.train.tracking`   -- MLflow logging on rank 0 and preview grids
* :mod:`~easyref.train.loop`       -- :func:`train` and its :class:`Trainer` (build, resume, step, track, save)
* :mod:`~easyref.train.cli`        -- ``easyref train``;  :mod:`~easyref.train.launch` -- ``easyref launch``
"""

from easyref.train.config import STAGES, TrainConfig, load_train_config

__all__ = ["STAGES", "TrainConfig", "load_train_config"]
