"""Linear evaluation on ImageNet (tfds 'imagenet2012'), the BYOL paper's protocol.

Frozen encoder, one linear layer, SGD with Nesterov momentum 0.9, batch 1024, lr 0.2 per 256
images (0.8) with cosine decay to 0, 80 epochs, no weight decay; random-resized crops and flips
for training, centre crops (224 of 256) for testing. The splits of the authors' code: the first
10,000 training images are held out for model selection, the classifier trains on the rest,
and the test set is the official validation set.
"""

from byol_jax import default_config


def get_config():
    config = default_config.linear_eval_config()
    config.batch_size = 1024
    config.num_epochs = 80
    config.base_learning_rate = 0.2
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 0.0
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.probe_split = "train[10000:]"
    config.data.eval_split = "validation"
    config.holdout_split = "train[:10000]"
    config.data.eval_crop_fraction = 0.875  # 224 / 256
    config.log_every = 100
    config.checkpoint_every = 2000
    return config
