"""Linear evaluation on CIFAR-10 (tfds 'cifar10'): the paper's protocol at 32 px.

Batch 256 (lr 0.2 x 256/256), 80 epochs; training on random-resized crops and flips of the
50,000 training images, testing on the 10,000 test images as they are (no crop at 32 px).
"""

from byol_jax import default_config


def get_config():
    config = default_config.linear_eval_config()
    config.batch_size = 256
    config.num_epochs = 80
    config.base_learning_rate = 0.2
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.probe_split = "train"
    config.data.eval_split = "test"
    config.log_every = 50
    config.checkpoint_every = 1000
    return config
