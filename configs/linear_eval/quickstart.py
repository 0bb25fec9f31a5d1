"""Linear evaluation of the quick start's encoder (scikit-learn digits, 16 px): a few hundred
steps on a CPU in a minute or two.

    python -m byol_jax.linear_eval --config configs/linear_eval/quickstart.py \
        --config.pretrained_workdir=workdirs/quickstart --workdir workdirs/quickstart_linear
"""

from byol_jax import default_config


def get_config():
    config = default_config.linear_eval_config()
    config.batch_size = 128
    config.total_steps = 300
    config.base_learning_rate = 0.2
    config.data.crop_area = (0.8, 1.0)  # 16 px digits: milder crops (55.0 % top-1 vs 50.3 % at 0.4)
    config.data.flip_p = 0.0  # digits are not mirror-symmetric
    config.log_every = 50
    config.checkpoint_every = 100
    config.eval_batch_size = 256
    return config
