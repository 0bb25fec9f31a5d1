"""Training-step throughput of the seed, byol-pytorch 0.8.2 (torch only; never imports byol_jax).

One step is what the seed's README loop does: the seed's default augmentation of both views
(one random draw per batch, as in the seed), online and target forward, backward, an Adam
(lr 3e-4) step and `update_moving_average()`. The network is a torchvision ResNet, by default
ResNet-18 with the CIFAR stem (conv1 3x3 stride 1 padding 1, no max-pool), hidden layer
'avgpool', the seed's projector/predictor sizes (4096 hidden, 256 out), images of 32 px.
Input is one fixed batch of uniform [0, 1) images made before timing, so no data loading is
measured. Run it with the torch environment:

    python benchmarks/seed_step.py --steps 20 --warmup 3 --threads 2 --json

With --json the last stdout line is one JSON object:
{"images_per_s", "step_time_s", "arch", "image_size", "batch", "steps", "warmup", "threads",
 "cifar_stem", "torch", "byol_pytorch"}; progress goes to stderr.
"""

import argparse
import importlib.metadata
import json
import sys
import time

import torch
import torchvision
from byol_pytorch import BYOL
from torch import nn

ARCHS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}


def make_net(arch: str, cifar_stem: bool, width: int = 64) -> nn.Module:
    """A torchvision ResNet; with `cifar_stem`, conv1 is 3x3 stride 1 and max-pool is removed.

    `width` is the base channel count (torchvision's 64): stages of width, 2x, 4x and 8x
    channels, as in byol_jax's `networks.ResNet(num_filters=width)`. torchvision fixes 64, so
    other widths rebuild the stages from torchvision's own blocks (`_make_layer` reads
    `inplanes`, which is reset first).
    """
    net = ARCHS[arch]()
    if width != 64:
        block = type(net.layer1[0])
        blocks = [len(stage) for stage in (net.layer1, net.layer2, net.layer3, net.layer4)]
        net.inplanes = width
        net.bn1 = nn.BatchNorm2d(width)
        for index, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2), strict=True)):
            setattr(
                net, f"layer{index + 1}", net._make_layer(block, width * 2**index, count, stride)
            )
        net.fc = nn.Linear(8 * width * block.expansion, net.fc.out_features)
    stem = (3, 1, 1) if cifar_stem else (7, 2, 3)
    net.conv1 = nn.Conv2d(
        3, width, kernel_size=stem[0], stride=stem[1], padding=stem[2], bias=False
    )
    if cifar_stem:
        net.maxpool = nn.Identity()
    return net


def train_step(learner: BYOL, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    """The seed README's step: loss, backward, optimiser step, target EMA update."""
    loss = learner(images)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    learner.update_moving_average()
    return loss.item()


def measure(args: argparse.Namespace) -> dict:
    """Runs `warmup` untimed and `steps` timed training steps; returns the figures."""
    torch.manual_seed(0)
    net = make_net(args.arch, args.cifar_stem, args.width)
    learner = BYOL(net, image_size=args.image_size, hidden_layer="avgpool")
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size)
    learner.train()
    for i in range(args.warmup):
        loss = train_step(learner, optimizer, images)
        print(f"warmup {i + 1}/{args.warmup}: loss {loss:.4f}", file=sys.stderr)
    start = time.perf_counter()
    for i in range(args.steps):
        loss = train_step(learner, optimizer, images)
        print(f"step {i + 1}/{args.steps}: loss {loss:.4f}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": args.batch * args.steps / elapsed,
        "step_time_s": elapsed / args.steps,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "cifar_stem": args.cifar_stem,
        "width": args.width,
        "torch": torch.__version__,
        "byol_pytorch": importlib.metadata.version("byol-pytorch"),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet18")
    parser.add_argument("--width", type=int, default=64, help="base channels (torchvision: 64)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument(
        "--cifar-stem",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="3x3 stride-1 conv1 and no max-pool (use --no-cifar-stem for ImageNet sizes)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be at least 2: BatchNorm in the projector needs 2 samples")
    if args.width < 1:
        parser.error("--width must be at least 1")
    if args.steps < 1 or args.warmup < 0 or args.threads < 0 or args.image_size < 1:
        parser.error("--steps must be >= 1; --warmup, --threads >= 0; --image-size >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"byol-pytorch {result['byol_pytorch']} {args.arch} {args.image_size}px "
            f"batch {args.batch}, {result['threads']} threads: "
            f"{result['images_per_s']:.1f} images/s ({result['step_time_s']:.3f} s/step)"
        )


if __name__ == "__main__":
    main()
