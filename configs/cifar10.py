"""CIFAR-10 (tfds 'cifar10'): ResNet-18 with the 3x3 stem, 32 px, views without blur.

The optimiser follows solo-learn's BYOL CIFAR recipe (LARS, base lr 1.0 per 256 images,
weight decay 1e-5, tau 0.99 -> 1), which reaches 92.6 % online linear top-1 in 1000 epochs.
"""

from byol_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.image_size = 32
    config.encoder = "resnet18"
    config.cifar_stem = True
    config.batch_size = 256
    config.num_epochs = 1000
    config.base_learning_rate = 1.0
    config.weight_decay = 1e-5
    config.warmup_epochs = 10
    config.base_tau = 0.99
    config.augment.name = "byol_cifar"
    config.log_every = 50
    config.checkpoint_every = 1000
    config.knn_every = 5000
    return config
