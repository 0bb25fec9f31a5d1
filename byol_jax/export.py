"""Write a trained encoder in torchvision's key names and layouts, as safetensors:

    python -m byol_jax.export --workdir workdirs/imagenet --format torchvision --out encoder.safetensors
    python -m byol_jax.export --pretrained official:pretrain_res50x1.pkl --out res50.safetensors

Then, in PyTorch: ``model = torchvision.models.resnet50(); model.fc = torch.nn.Identity();
model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"), strict=True)``
(``--with_head`` also writes the online probe as ``fc``, for ``resnet50(num_classes=K)``).
``--use_target`` writes the target network's encoder instead of the online one.
"""

import sys

from absl import app, flags

from byol_jax import cli

_SOURCE = cli.define_source_flags()
_FORMAT = flags.DEFINE_enum("format", "torchvision", ["torchvision"], "What to write.")
_OUT = flags.DEFINE_string("out", None, "The .safetensors file to write.")
_TARGET = flags.DEFINE_bool("use_target", False, "Write the target network's encoder.")
_HEAD = flags.DEFINE_bool("with_head", False, "Also write the online probe as fc.")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from byol_jax import pretrained  # noqa: PLC0415 (after flags: JAX reads its flags at import)
    from byol_jax.weights import torchvision  # noqa: PLC0415

    if not _OUT.value.endswith(".safetensors"):
        cli.exit_with(
            "export", ValueError(f"--out must end with .safetensors, got {_OUT.value!r}.")
        )
    try:
        learner, state = pretrained.load(cli.source(_SOURCE))
        tensors = torchvision.from_learner(
            learner, state, use_target=_TARGET.value, with_head=_HEAD.value
        )
        torchvision.save(_OUT.value, tensors)
    except (*cli.USER_ERRORS, torchvision.TorchvisionWeightsError) as error:
        cli.exit_with("export", error)
    print(f"Wrote {len(tensors)} tensors of {learner.encoder.__class__.__name__} to {_OUT.value}.")


if __name__ == "__main__":
    sys.exit(app.run(main))
