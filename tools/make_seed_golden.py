"""Golden reference values from the seed (byol-pytorch 0.8.2) for byol_jax's parity tests.

Run it in an environment with torch, torchvision and byol-pytorch 0.8.2 (never in the test suite,
which must not depend on torch); the output file is committed:

    python tools/make_seed_golden.py --out tests/data/seed_golden.npz

Everything is float32 on CPU, single-threaded, with `torch.use_deterministic_algorithms(True)`
and a fixed seed per section, so a rerun writes the same numbers. Load with `np.load(path)`.

Keys (all float32 numpy arrays; `<torch name>` is a `BYOL.state_dict()` name such as
`online_encoder.net.conv.weight`, `online_encoder.projector.1.running_var`,
`online_predictor.3.bias` or `target_encoder.net.bn.num_batches_tracked`; the duplicate top-level
`net.*` entries, the same tensors as `online_encoder.net.*`, are left out):

| key | shape | what |
| --- | --- | --- |
| `loss/p`, `loss/z` | [5, 8] | random predictions and targets |
| `loss/value` | [5] | `loss_fn(p, z)` = 2 - 2 cos(p, z) per example |
| `ema/old`, `ema/new` | [3, 4] | random target and online tensors |
| `ema/value` | [3, 4] | `EMA(0.9).update_average(old, new)` = 0.9 old + 0.1 new |
| `<mode>/images` | [6, 8, 8, 3] | the step's input, NHWC (torch ran on its NCHW transpose) |
| `<mode>/view_two` | [6, 8, 8, 3] | `byol_flip` only: the second view (horizontal flip), NHWC |
| `<mode>/init/<torch name>` | torch layout | every parameter and buffer after `BYOL(...)` returned |
| `<mode>/loss` | [] | `learner(images)` in train mode |
| `<mode>/step/online_representation` | [12, 4] | hidden layer output for the two views |
| `<mode>/step/online_projection` | [12, 8] | online projector output |
| `<mode>/step/online_prediction` | [12, 8] | online predictor output |
| `<mode>/step/target_projection` | [12, 8] | target projector output (no gradient) |
| `<mode>/grad/<torch name>` | torch layout | gradient of every online parameter but `net.fc.*` |
| `<mode>/after/<torch name>` | torch layout | every parameter and buffer after SGD(lr=0.5) and EMA |
| `<mode>/embed/projection` | [6, 8] | `learner(images, return_embedding=True)[0]`, train mode |
| `<mode>/embed/representation` | [6, 4] | the same call's representation, hidden_layer='avgpool' |
| `<mode>/embed/representation_index_m2` | [6, 4] | same, hidden_layer=-2 (TinyNet's avgpool child) |
| `<mode>/embed/representation_index_m1` | [6, 10] | same, hidden_layer=-1 (the net's own output) |
| `<mode>/embed_eval/projection` | [6, 8] | as `embed/`, in eval mode (BatchNorm running stats) |
| `<mode>/embed_eval/representation` | [6, 4] | as `embed/`, in eval mode |

Modes:

- `byol`: use_momentum=True, moving_average_decay=0.9, both views the identity; after the SGD
  step `learner.update_moving_average()` is called.
- `byol_flip`: as `byol`, but the second view is `images.flip(-1)` (a horizontal flip), so that
  the pairing of views in the loss (p1 with z2, p2 with z1) is observable.
- `simsiam`: use_momentum=False (SimSiam projector, no target copy, no EMA call).

The learner is `BYOL(TinyNet(), image_size=8, hidden_layer='avgpool', projection_size=8,
projection_hidden_size=16, augment_fn=identity, moving_average_decay=0.9, use_momentum=...)`.
The `embed*` values are computed on deep copies of the learner made after construction and
before the training step, so they neither see nor change the step; `embed/` in train mode (the
mode `learner.train()` leaves it in: BatchNorm uses the batch's statistics), `embed_eval/` after
`.eval()` (BatchNorm uses the running statistics recorded under `init/`).

Seed behaviours that matter for parity (checked by this script's assertions where possible):

- Construction order: TinyNet's layers, then the online predictor (in `BYOL.__init__`), then a
  mock forward on `torch.randn(2, 3, 8, 8)` in train mode. That forward creates the projector
  (size inferred from the hidden layer), runs the online encoder once (updating its BatchNorm
  running stats), and only then deep-copies the online encoder into the target, which therefore
  starts with the online parameters and with the mock-updated running stats; the target's own
  forward in that mock call updates its copy once more (num_batches_tracked: online 1, target 2).
- Target update: `update_moving_average` averages `parameters()` only (BatchNorm affine scale and
  bias included); BatchNorm running stats of the target are never averaged, they move only by
  the target's own train-mode forwards. The online predictor has no target counterpart.
- SimSiam mode: the "target" forward is a second train-mode pass through the online encoder
  under no_grad, so every step (and the mock forward) updates the online BatchNorm running stats
  twice. The projector is Linear(no bias)-BN-ReLU-Linear(no bias)-BN-ReLU-Linear(no bias)-BN
  (affine=False); the predictor stays the BYOL MLP with biases.
- Layers after the hidden layer (TinyNet's `fc`) get no gradient (`grad` is None, not zero), so
  the seed's optimiser leaves them unchanged; they have no `grad/` key.
- Both views are concatenated into one batch of 12 for each encoder call, so BatchNorm batch
  statistics are shared by the two views.
- torch BatchNorm: momentum 0.1 (running = 0.9 running + 0.1 batch), eps 1e-5; normalisation
  uses the biased batch variance, but running_var is updated with the UNBIASED variance
  (n / (n - 1) factor, n = N*H*W for BatchNorm2d, N for BatchNorm1d). A JAX BatchNorm that
  keeps the biased variance matches every loss, gradient and parameter here, but not
  `running_var` (nor `embed_eval/`, unless it is given the torch running stats).
- num_batches_tracked is stored as float32 (it is int64 in torch); with momentum set it is unused.
- `loss_fn` normalises with `F.normalize` (divides by max(norm, 1e-12)); the loss is the mean
  over the batch of loss(p1, z2) + loss(p2, z1), so it lies in [0, 8].
"""

import argparse
import copy
import pathlib

import numpy as np
import torch
from byol_pytorch import BYOL
from byol_pytorch.byol_pytorch import EMA, NetWrapper, loss_fn
from torch import nn

IMAGE_SIZE = 8
BATCH = 6
PROJECTION_SIZE = 8
PROJECTION_HIDDEN_SIZE = 16
DECAY = 0.9
LEARNING_RATE = 0.5
MODES = {
    # mode: (seed, use_momentum, second view)
    "byol": (0, True, None),
    "byol_flip": (1, True, lambda x: x.flip(-1)),
    "simsiam": (2, False, None),
}


class TinyNet(nn.Module):
    """conv 3x3 (3->4) -> BatchNorm -> ReLU -> global average pool -> flatten -> fc (4->10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.avgpool(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


def _identity(x):
    return x


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().copy()


def _nhwc(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] torch -> [N, H, W, C] numpy."""
    return _numpy(images.permute(0, 2, 3, 1))


def learner_arrays(learner: BYOL, prefix: str) -> dict[str, np.ndarray]:
    """Every parameter and buffer of the learner, keyed `prefix/<state_dict name>`."""
    # `net.*` is the same module as `online_encoder.net.*` (BYOL keeps both references).
    return {
        f"{prefix}/{name}": _numpy(value)
        for name, value in learner.state_dict().items()
        if not name.startswith("net.")
    }


def loss_golden() -> dict[str, np.ndarray]:
    torch.manual_seed(100)
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    return {"loss/p": _numpy(p), "loss/z": _numpy(z), "loss/value": _numpy(loss_fn(p, z))}


def ema_golden() -> dict[str, np.ndarray]:
    torch.manual_seed(101)
    old, new = torch.randn(3, 4), torch.randn(3, 4)
    value = EMA(DECAY).update_average(old, new)
    assert torch.allclose(value, DECAY * old + (1 - DECAY) * new)
    return {"ema/old": _numpy(old), "ema/new": _numpy(new), "ema/value": _numpy(value)}


def build_learner(use_momentum: bool, view_two, hidden_layer="avgpool") -> BYOL:
    return BYOL(
        TinyNet(),
        image_size=IMAGE_SIZE,
        hidden_layer=hidden_layer,
        projection_size=PROJECTION_SIZE,
        projection_hidden_size=PROJECTION_HIDDEN_SIZE,
        augment_fn=_identity,
        augment_fn2=view_two,
        moving_average_decay=DECAY,
        use_momentum=use_momentum,
    )


def _embed(learner: BYOL, images: torch.Tensor, layer, return_projection=True):
    """(projection, representation), or the representation alone, of a copy of the learner
    whose hidden layer is `layer`."""
    learner = copy.deepcopy(learner)
    source = learner.online_encoder
    wrapper = NetWrapper(
        source.net,
        PROJECTION_SIZE,
        PROJECTION_HIDDEN_SIZE,
        layer=layer,
        use_simsiam_mlp=source.use_simsiam_mlp,
    )
    wrapper.projector = source.projector
    learner.online_encoder = wrapper
    with torch.no_grad():
        return learner(images, return_embedding=True, return_projection=return_projection)


def embed_golden(learner: BYOL, images: torch.Tensor, prefix: str) -> dict[str, np.ndarray]:
    """Embeddings in train mode (`embed/`) and eval mode (`embed_eval/`); the learner is kept."""
    out = {}
    projection, representation = _embed(learner, images, "avgpool")
    _, by_index = _embed(learner, images, -2)
    net_output = _embed(learner, images, -1, return_projection=False)
    torch.testing.assert_close(by_index, representation, rtol=0, atol=0)
    out[f"{prefix}/embed/projection"] = _numpy(projection)
    out[f"{prefix}/embed/representation"] = _numpy(representation)
    out[f"{prefix}/embed/representation_index_m2"] = _numpy(by_index)
    out[f"{prefix}/embed/representation_index_m1"] = _numpy(net_output)
    evaluated = copy.deepcopy(learner).eval()
    with torch.no_grad():
        projection, representation = evaluated(images, return_embedding=True)
    out[f"{prefix}/embed_eval/projection"] = _numpy(projection)
    out[f"{prefix}/embed_eval/representation"] = _numpy(representation)
    return out


def _record_outputs(module: nn.Module, sink: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _m, _i, output: sink.append(output.detach()))


def _capture_step(learner: BYOL, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Runs `learner(images)` in train mode, capturing the networks' outputs with hooks."""
    online = learner.online_encoder
    target = learner.target_encoder if learner.use_momentum else online
    captured = {"representation": [], "projection": [], "prediction": [], "target": []}
    handles = [
        _record_outputs(online.net.avgpool, captured["representation"]),
        _record_outputs(online.projector, captured["projection"]),
        _record_outputs(learner.online_predictor, captured["prediction"]),
    ]
    if target is not online:
        handles.append(_record_outputs(target.projector, captured["target"]))
    learner.train()
    loss = learner(images)
    for handle in handles:
        handle.remove()
    if target is online:
        # SimSiam: the online projector ran twice, first with gradients, then as the target.
        first, second = captured["projection"]
        captured["projection"], captured["target"] = [first], [second]
        captured["representation"] = captured["representation"][:1]
    assert all(len(v) == 1 for v in captured.values()), {k: len(v) for k, v in captured.items()}
    outputs = {
        "online_representation": torch.flatten(captured["representation"][0], 1),
        "online_projection": captured["projection"][0],
        "online_prediction": captured["prediction"][0],
        "target_projection": captured["target"][0],
    }
    return loss, outputs


def step_golden(prefix: str, seed: int, use_momentum: bool, view_two) -> dict[str, np.ndarray]:
    """Construction, embeddings, then one SGD step (+ EMA when use_momentum) of the seed's BYOL."""
    torch.manual_seed(seed)
    learner = build_learner(use_momentum, view_two)
    out = learner_arrays(learner, f"{prefix}/init")
    images = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    out[f"{prefix}/images"] = _nhwc(images)
    if view_two is not None:
        out[f"{prefix}/view_two"] = _nhwc(view_two(images))
    out.update(embed_golden(learner, images, prefix))

    optimizer = torch.optim.SGD(learner.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    loss, outputs = _capture_step(learner, images)
    out[f"{prefix}/loss"] = _numpy(loss)
    out.update({f"{prefix}/step/{k}": _numpy(v) for k, v in outputs.items()})
    loss.backward()
    for name, param in learner.named_parameters(remove_duplicate=False):
        if name.startswith("net."):
            continue  # the same tensors as online_encoder.net.*
        if name.startswith("online_encoder.net.fc."):
            assert param.grad is None, name  # after the hidden layer: unused, skipped by SGD
        elif name.startswith(("online_encoder.", "online_predictor.")):
            out[f"{prefix}/grad/{name}"] = _numpy(param.grad)
        else:
            assert param.grad is None, name  # the target is never differentiated
    optimizer.step()
    if use_momentum:
        learner.update_moving_average()
    out.update(learner_arrays(learner, f"{prefix}/after"))
    _check_step(out, prefix, use_momentum)
    return out


def _check_step(out: dict[str, np.ndarray], prefix: str, use_momentum: bool) -> None:
    """Asserts the seed behaviours the docstring states, on the recorded arrays."""
    init, after, grad = f"{prefix}/init/", f"{prefix}/after/", f"{prefix}/grad/"
    for key in [k for k in out if k.startswith(grad)]:
        name = key[len(grad) :]
        expected = out[init + name] - LEARNING_RATE * out[key]
        np.testing.assert_allclose(out[after + name], expected, rtol=1e-6, atol=1e-6)
    tracked = "net.bn.num_batches_tracked"
    if not use_momentum:
        assert out[f"{init}online_encoder.{tracked}"] == 2, "mock forward: online BN twice"
        assert out[f"{after}online_encoder.{tracked}"] == 4
        return
    assert out[f"{init}online_encoder.{tracked}"] == 1
    assert out[f"{init}target_encoder.{tracked}"] == 2
    for key in [k for k in out if k.startswith(grad + "online_encoder.")]:
        name = key[len(grad + "online_encoder.") :]
        target, online = f"target_encoder.{name}", f"online_encoder.{name}"
        np.testing.assert_array_equal(out[init + target], out[init + online])
        expected = DECAY * out[init + target] + (1 - DECAY) * out[after + online]
        np.testing.assert_allclose(out[after + target], expected, rtol=1e-6, atol=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("seed_golden.npz"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)

    golden = {**loss_golden(), **ema_golden()}
    for prefix, (seed, use_momentum, view_two) in MODES.items():
        golden.update(step_golden(prefix, seed, use_momentum, view_two))
    assert all(v.dtype == np.float32 for v in golden.values())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **golden)
    for key in sorted(golden):
        print(f"{key:70s} {tuple(golden[key].shape)}")
    print(f"{len(golden)} arrays -> {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
