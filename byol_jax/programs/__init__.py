"""The programs behind the entry points: ``pretraining`` (``python -m byol_jax.train``) and
``linear_evaluation`` (``python -m byol_jax.linear_eval``). Each is a library function,
``train_and_evaluate(config, workdir)``, that a notebook can call as well."""
