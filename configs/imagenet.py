"""ImageNet (tfds 'imagenet2012'): the BYOL paper's recipe.

ResNet-50, global batch 4096 over all devices, LARS (momentum 0.9, trust coefficient 1e-3,
biases and BatchNorm excluded), base lr 0.2 x batch/256 with 10 warm-up epochs and cosine
decay, tau cosine from 0.996 to 1, random-resized crops on the host, the asymmetric views.

The official code's presets by length: ``--config configs/imagenet.py:300`` picks the
300-epoch learning rate, tau and weight decay (EPOCH_PRESETS: 40, 100, 300, 1000).
tfds needs the ImageNet tar files in ``<data_dir>/downloads/manual/`` (it cannot download
them); the error message says so when they are missing.
"""

from byol_jax import default_config

EPOCH_PRESETS = default_config.EPOCH_PRESETS


def get_config(epochs: str = "1000"):
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.host_crop = True
    config.image_size = 224
    config.encoder = "resnet50"
    config.batch_size = 4096
    default_config.apply_epoch_preset(config, int(epochs))
    config.warmup_epochs = 10
    config.optimizer = "lars"
    config.dtype = "auto"  # bfloat16 on TPU/GPU (the paper's code: float32; force it so)
    config.log_every = 100
    config.checkpoint_every = 2000
    config.knn_at_end = False  # a 1.28M-image bank: use python -m byol_jax.linear_eval
    return config
