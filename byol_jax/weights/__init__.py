"""Weights from elsewhere, and byol_jax's for elsewhere: the BYOL authors' released checkpoints
(``official``) and torchvision ResNet state dicts (``torchvision``, both ways). What
``byol_jax.pretrained.load('official:PATH')`` and ``python -m byol_jax.export`` build on."""
