"""Any folder of images: ``--config.data.folder=/path/to/images``.

The folder holds ``train/<label>/*.jpg`` (and optionally ``test/<label>/*.jpg``), the layout
tfds.ImageFolder reads, or just ``*.jpg`` files without labels (then kNN is skipped).
Images of any size are random-resized-cropped on the host, as for ImageNet.
"""

from byol_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "folder"
    config.data.folder = ""  # required: --config.data.folder=/path/to/images
    config.data.host_crop = True
    config.image_size = 128
    config.encoder = "resnet18"
    config.batch_size = 128
    config.num_epochs = 100
    config.base_learning_rate = 1.0
    config.weight_decay = 1e-6
    config.base_tau = 0.99
    config.log_every = 20
    return config
