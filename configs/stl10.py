"""STL-10 (tfds 'stl10'): pre-train at 96 px on 'train+unlabelled', the 100,000 unlabelled
images and the 5,000 labelled ones. The online probe learns from the labelled 5 % of each batch
(unlabelled rows carry label -1 and are skipped), so ``probe_top1`` is an accuracy on labelled
images; the labelled 'train' split is the kNN bank and 'test' the evaluation split."""

from byol_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.name = "stl10"
    config.data.train_split = "train+unlabelled"
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
