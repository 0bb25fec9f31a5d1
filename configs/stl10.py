"""STL-10 (tfds 'stl10'): pre-train on the 100,000 unlabelled images at 96 px; the labelled
'train' split is the kNN bank / probe set and 'test' the evaluation split."""

from byol_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.name = "stl10"
    config.data.train_split = "unlabelled"
    config.data.probe_split = "train"
    config.data.eval_split = "test"
    config.image_size = 96
    config.encoder = "resnet18"
    config.batch_size = 256
    config.num_epochs = 300
    config.base_learning_rate = 1.0
    config.weight_decay = 1e-5
    config.base_tau = 0.99
    config.augment.name = "byol"
    config.log_every = 50
    return config
