"""Imagenette (tfds 'imagenette/320px-v2'), the official BYOL code's small recipe:
ResNet-18 at 128 px, random-resized crops on the host, the paper's asymmetric views.
The official code reports about 92.3 % online-probe top-1 after 1000 epochs."""

from byol_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.name = "imagenette/320px-v2"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.host_crop = True
    config.image_size = 128
    config.encoder = "resnet18"
    config.batch_size = 256
    config.num_epochs = 1000
    config.base_learning_rate = 2.0
    config.weight_decay = 1e-6
    config.base_tau = 0.99
    config.log_every = 50
    return config
