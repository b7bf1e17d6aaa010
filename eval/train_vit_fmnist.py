"""Train tokcomp's offline default model: a timm ViT on Fashion-MNIST (CPU).

The shipped model keeps DeiT's token layout: a 28x28 grey image cut into 2x2 patches gives
an exact 14x14 grid = 196 patch tokens + 1 class token = 197 tokens, 12 blocks, class-token
head. Only the width is reduced (96, 3 heads) so that training fits on two CPU cores.

Training has two stages, because 197 tokens are ~5x more expensive than 50 and the machine
is shared (see eval/models/vit-fmnist/README.md):

1. coarse: ``--coarse-epochs`` epochs at patch size ``--coarse-patch`` (4: a 7x7 grid,
   50 tokens), peak LR ``--coarse-lr``;
2. fine: the patch embedding is resampled to ``--patch-size`` (2) with FlexiViT's
   pseudo-inverse resize (``timm.layers.resample_patch_embed``), the position embedding is
   interpolated 7x7 -> 14x14, and the model is trained ``--epochs`` more epochs at 197 tokens
   with peak LR ``--lr``. The saved model is only ever this 197-token model.

``--coarse-epochs 0`` trains at ``--patch-size`` from scratch (single stage), or from
``--init`` (resampled to ``--patch-size`` if that model's differs).
``--canvas 42 --patch-size 3`` keeps the 14x14 grid but pastes each garment at a random
place on a black 42x42 canvas, so that, as in ImageNet photos, part of every image is
background the class does not depend on. ``--token-label-weight`` (a per-patch loss) and
``--registers`` are the other variants the model cards compare.

The run checkpoints after every epoch to ``<out>/.train_state/last.pt`` and resumes from it
when started again with the same command (the checkpoint is deleted once the model is
written). At the end it writes ``<out>/model.safetensors`` (an ``--out`` that already holds
one, such as the shipped model's, is refused before any work unless ``--force``) with the
metadata needed to rebuild the model:

    meta = safetensors.safe_open(path, "pt").metadata()
    model = timm.create_model(meta["timm_model"], pretrained=False,
                              **json.loads(meta["model_kwargs"]))
    model.load_state_dict(safetensors.torch.load_file(path))

Example (the exact command used for the shipped model is in eval/models/vit-fmnist/README.md):

    nohup .venv/bin/python eval/train_vit_fmnist.py --force >> train.log 2>&1 &
"""

from __future__ import annotations

import os

# Sleeping (not spinning) OpenMP workers: on a shared 2-core machine the default spin-wait
# made each step ~4x more CPU time and ~3x slower (measured). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import (
    REPO,
    add_force_argument,
    check_heads_divide,
    check_model_output,
    finite_loss,
    non_negative_float,
    positive_float,
    refuse_ignored,
    refusing,
    script_parser,
    share,
)

from tokcomp.files import torch_save_whole, write_text_whole
from tokcomp.harness.arguments import non_negative_int, positive_int
from tokcomp.harness.fashion_mnist import (
    CANVAS_KEY,
    CLASSES,
    DEFAULT_ROOT,
    IMAGE_SIZE,
    load_arrays,
    place_at_fixed_offsets,
)
from tokcomp.pretrained import save_atomically

TIMM_MODEL = "vit_tiny_patch16_224"
# Fashion-MNIST training-set pixel statistics (pixels scaled to [0, 1]).
MEAN = 0.2860
STD = 0.3530


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the ones used for the shipped model."""
    p = build_parser()
    args = p.parse_args(argv)
    check_garment_sizes(p, args)
    check_heads_divide(p, args, "--num-heads", "--embed-dim")
    if args.canvas < IMAGE_SIZE:
        p.error(f"--canvas must be at least {IMAGE_SIZE} (a Fashion-MNIST image's side)")
    if args.coarse_epochs == 0 and args.epochs == 0:
        p.error("--coarse-epochs and --epochs are both 0: nothing to train")
    for option in ("--coarse-patch", "--coarse-lr", "--coarse-warmup-epochs"):
        refuse_ignored(p, args, option, "--coarse-epochs above 0", args.coarse_epochs > 0)
    refuse_ignored(
        p, args, "--foreground-threshold", "--token-label-weight", bool(args.token_label_weight)
    )
    peaks = [stage.lr for stage in stages(args)]
    if args.min_lr > min(peaks):
        p.error(f"--min-lr {args.min_lr} is above a peak learning rate ({min(peaks)})")
    if args.init and not Path(args.init).is_file():
        p.error(f"--init {args.init}: no such file; give a model.safetensors")
    check_model_output(p, args)
    return args


def build_parser() -> argparse.ArgumentParser:
    """The script's options (see parse_args)."""
    p = script_parser(__doc__)
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument(
        "--out", default=str(REPO / "eval" / "models" / "vit-fmnist"), help="output folder"
    )
    add_force_argument(p)
    p.add_argument(
        "--coarse-epochs", type=non_negative_int, default=20, help="stage-1 epochs (0: none)"
    )
    p.add_argument("--coarse-patch", type=positive_int, default=4, help="stage-1 patch size")
    p.add_argument("--coarse-lr", type=positive_float, default=1e-3, help="stage-1 peak LR")
    p.add_argument("--coarse-warmup-epochs", type=non_negative_float, default=0.5)
    p.add_argument(
        "--epochs", type=non_negative_int, default=4, help="final-stage epochs at --patch-size"
    )
    p.add_argument("--patch-size", type=positive_int, default=2, help="final patch size (2: 14x14)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="final-stage peak LR")
    p.add_argument(
        "--warmup-epochs", type=non_negative_float, default=0.2, help="final-stage warmup"
    )
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument("--label-smoothing", type=share, default=0.1)
    p.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="0: off")
    p.add_argument("--drop-path", type=share, default=0.0)
    p.add_argument(
        "--token-label-weight",
        type=non_negative_float,
        default=0.0,
        help="weight of the per-patch loss: the head applied to every final patch token must "
        "predict the image's class on garment patches and nothing (uniform) on background",
    )
    p.add_argument(
        "--foreground-threshold",
        type=non_negative_int,
        default=25,
        help="a patch whose mean pixel (0-255) exceeds this counts as garment",
    )
    p.add_argument("--pad", type=non_negative_int, default=2, help="random-crop padding in pixels")
    p.add_argument(
        "--canvas",
        type=positive_int,
        default=IMAGE_SIZE,
        help="model input size; above 28, each garment is pasted at a random place on a black "
        "canvas this size (test images: one fixed place each), like an object in a photo",
    )
    p.add_argument(
        "--garment-sizes",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="with --canvas: resize each training garment to a random side in [MIN, MAX] px "
        "before pasting it (test garments stay 28 px), so that how much of the image the "
        "garment covers says nothing about its class, as RandomResizedCrop does for DeiT",
    )
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flip")
    p.add_argument("--embed-dim", type=positive_int, default=96)
    p.add_argument("--num-heads", type=positive_int, default=3)
    p.add_argument("--depth", type=positive_int, default=12)
    p.add_argument(
        "--registers",
        type=non_negative_int,
        default=0,
        help="register tokens (Darcet et al. 2024) next to the class token",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument(
        "--fused-attn",
        action="store_true",
        help="use timm's fused SDPA attention in training (slower on CPU than plain matmul)",
    )
    p.add_argument(
        "--eval-images",
        type=non_negative_int,
        default=2000,
        help="test images used by the per-epoch monitoring eval (the final eval uses all)",
    )
    p.add_argument(
        "--limit-steps", type=non_negative_int, default=0, help="debug: stop each epoch early"
    )
    p.add_argument("--fresh", action="store_true", help="ignore an existing resume file")
    p.add_argument(
        "--init",
        help="start from this model.safetensors (its patch size must match the first stage)",
    )
    return p


def check_garment_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse --garment-sizes that would be ignored (no --canvas) or do not fit the canvas."""
    if args.garment_sizes is None:
        return
    low, high = args.garment_sizes
    if args.canvas == IMAGE_SIZE:
        parser.error("--garment-sizes needs --canvas larger than 28 to paste the garments on")
    if not 1 <= low <= high <= args.canvas:
        parser.error(f"--garment-sizes must satisfy 1 <= MIN <= MAX <= --canvas ({args.canvas})")


@dataclass
class Stage:
    """One training stage: a patch size, a number of epochs and an LR schedule."""

    name: str
    epochs: int
    patch: int
    lr: float
    warmup_epochs: float


def stages(args: argparse.Namespace) -> list[Stage]:
    """The stages of this run, in order (empty ones dropped)."""
    out = [
        Stage(
            "coarse",
            args.coarse_epochs,
            args.coarse_patch,
            args.coarse_lr,
            args.coarse_warmup_epochs,
        ),
        Stage("fine", args.epochs, args.patch_size, args.lr, args.warmup_epochs),
    ]
    return [s for s in out if s.epochs > 0]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_kwargs(args: argparse.Namespace, patch: int) -> dict:
    """Keyword arguments for ``timm.create_model`` (stored in the checkpoint metadata)."""
    return {
        "img_size": args.canvas,
        "patch_size": patch,
        "in_chans": 1,
        "embed_dim": args.embed_dim,
        "depth": args.depth,
        "num_heads": args.num_heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "class_token": True,
        "reg_tokens": args.registers,
        "global_pool": "token",
        "num_classes": len(CLASSES),
    }


def create(args: argparse.Namespace, patch: int) -> torch.nn.Module:
    """A fresh model at ``patch`` (random init from the current torch RNG state)."""
    return timm.create_model(
        TIMM_MODEL, pretrained=False, drop_path_rate=args.drop_path, **model_kwargs(args, patch)
    )


def repatch(model: torch.nn.Module, args: argparse.Namespace, patch: int) -> torch.nn.Module:
    """Copy ``model`` into a model with patch size ``patch``.

    The patch-embedding kernel is resampled with FlexiViT's pseudo-inverse resize and the
    absolute position embedding is interpolated (bicubic) to the new grid, register tokens
    ``args`` asks for are added (`with_registers`); every other weight is copied unchanged.
    """
    new = create(args, patch)
    sd = model.state_dict()
    sd["patch_embed.proj.weight"] = resample_patch_embed(
        sd["patch_embed.proj.weight"], [patch, patch]
    )
    sd["pos_embed"] = resample_abs_pos_embed(
        sd["pos_embed"],
        new_size=list(new.patch_embed.grid_size),
        old_size=list(model.patch_embed.grid_size),
        num_prefix_tokens=model.num_prefix_tokens,
    )
    new.load_state_dict(with_registers(sd, new))
    return new


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, position embedding and class token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
    )


def data_config(canvas: int) -> dict:
    """The preprocessing the model expects, in timm's data-config vocabulary (plus the
    canvas the harness pastes Fashion-MNIST test images on, when there is one)."""
    placement = {CANVAS_KEY: canvas} if canvas != IMAGE_SIZE else {}
    return {
        "input_size": [1, canvas, canvas],
        **placement,
        "mean": [MEAN],
        "std": [STD],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float normalised."""
    x = images_u8.float().div_(255.0)
    return ((x - MEAN) / STD).unsqueeze(1)


def paste_resized(
    images_u8: torch.Tensor, canvas: int, sizes: tuple[int, int], gen: torch.Generator
) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, canvas, canvas): each garment resized (bilinear) to a random
    side in ``sizes`` and pasted at a random place on black, all in one affine resampling."""
    b = images_u8.shape[0]
    size = torch.randint(sizes[0], sizes[1] + 1, (b,), generator=gen).float()
    top_left = (torch.rand(b, 2, generator=gen) * (canvas - size[:, None] + 1)).floor()
    # Canvas pixel u shows garment point (u - top_left) / size of the garment's extent; in
    # grid_sample's [-1, 1] coordinates (align_corners=False) that is scale * x + shift.
    scale = canvas / size
    shift = (canvas - 2 * top_left) / size[:, None] - 1  # (B, 2) as (row, column)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 1], shift[:, 0]  # x is the column
    grid = F.affine_grid(theta, [b, 1, canvas, canvas], align_corners=False)
    out = F.grid_sample(images_u8[:, None].float(), grid, align_corners=False)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8)


def augment(images_u8: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip on uint8 images."""
    b, h, w = images_u8.shape
    if pad > 0:
        padded = F.pad(images_u8, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        images_u8 = padded[torch.arange(b)[:, None, None], rows, cols]
    if flip:
        do_flip = torch.rand(b, generator=gen) < 0.5
        images_u8 = torch.where(do_flip[:, None, None], images_u8.flip(-1), images_u8)
    return images_u8


def patch_brightness(images_u8: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, patches) mean pixel (0-255) of each patch, row-major."""
    b, h, w = images_u8.shape
    cells = images_u8.float().view(b, h // patch, patch, w // patch, patch).mean((2, 4))
    return cells.flatten(1)


def foreground_patches(images_u8: torch.Tensor, patch: int, threshold: int) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, patches) bool: which patches show the garment (row-major)."""
    return patch_brightness(images_u8, patch) > threshold


def token_label_loss(
    patch_logits: torch.Tensor, labels: torch.Tensor, foreground: torch.Tensor
) -> torch.Tensor:
    """Per-patch loss: garment patches predict the image label, background ones nothing.

    Token labelling (Jiang et al. 2021, LV-ViT) with the image label as the dense target on
    the garment and a uniform target on the background, meant to keep the evidence on the
    garment's tokens (the model card reports what it did to token pruning: nothing useful).
    """
    logp = patch_logits.float().log_softmax(-1)  # (B, P, K)
    on_label = -logp.gather(-1, labels[:, None, None].expand(-1, logp.shape[1], 1))[..., 0]
    uniform = -logp.mean(-1)
    return torch.where(foreground, on_label, uniform).mean()


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """Linear warmup then cosine decay to ``min_lr``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy on ``images`` (uint8, (N, H, W))."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def with_registers(state: dict, model: torch.nn.Module) -> dict:
    """``state`` with the register tokens ``model`` has and ``state`` lacks added.

    New registers start as small distinct random vectors (identical ones would stay
    identical) with a zero position embedding, between the class token and the patches.
    """
    registers = 0 if model.reg_token is None else model.reg_token.shape[1]
    missing = registers - (state["reg_token"].shape[1] if "reg_token" in state else 0)
    if missing == 0:
        return state
    if missing < 0 or "reg_token" in state:
        raise SystemExit(f"cannot go from {registers - missing} register tokens to {registers}")
    state = dict(state)
    state["reg_token"] = torch.randn(1, registers, model.embed_dim) * 0.02
    if not model.no_embed_class:
        pos = state["pos_embed"]
        cls = model.num_prefix_tokens - registers
        zeros = pos.new_zeros(1, registers, pos.shape[-1])
        state["pos_embed"] = torch.cat([pos[:, :cls], zeros, pos[:, cls:]], dim=1)
    return state


def load_init(
    model: torch.nn.Module, path: str, args: argparse.Namespace
) -> tuple[torch.nn.Module, float, float, list]:
    """Load the weights of an earlier run, resampled to ``model``'s patch size when the
    saved one differs; return the model, the run's wall time, CPU time and history."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    saved = json.loads(meta["model_kwargs"])
    patch = model.patch_embed.patch_size[0]
    if saved["patch_size"] != patch:
        earlier = timm.create_model(TIMM_MODEL, pretrained=False, **saved)
        earlier.load_state_dict(load_file(str(path)))
        model = repatch(earlier, args, patch)
    else:
        model.load_state_dict(with_registers(load_file(str(path)), model))
    rec = {"event": f"init from {path}", "init_test_top1": meta.get("test_top1")}
    print(json.dumps(rec), flush=True)
    return model, float(meta["train_wall_s"]), float(meta["train_cpu_s"]), [rec]


def save_model(
    path: Path, model: torch.nn.Module, args: argparse.Namespace, patch: int, extra: dict
) -> None:
    """Write ``model`` as safetensors (fp32) with the loading metadata."""
    meta = {
        "timm_model": TIMM_MODEL,
        "model_kwargs": json.dumps(model_kwargs(args, patch)),
        "data_config": json.dumps(data_config(args.canvas)),
        "classes": json.dumps(list(CLASSES)),
        "train_args": json.dumps(vars(args)),
        "dataset": "Fashion-MNIST (Xiao et al. 2017), IDX files from dataset-fashion-mnist",
        **{k: str(v) for k, v in extra.items()},
    }
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_atomically(tensors, path, meta)


@dataclass
class Data:
    """The training images and labels, and the test ones (placed on the canvas)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    monitored: int  # the first test images, evaluated after every epoch

    def monitor(self, model: torch.nn.Module, bf16: bool) -> float:
        """Top-1 on the monitored test images."""
        return evaluate(model, self.test_x[: self.monitored], self.test_y[: self.monitored], bf16)

    def test_top1(self, model: torch.nn.Module) -> float:
        """Plain float32 top-1 on every test image."""
        return evaluate(model, self.test_x, self.test_y, bf16=False)


def load_data(args: argparse.Namespace) -> Data:
    """Fashion-MNIST as tensors; a missing or broken data folder is one line naming the fix."""
    with refusing(build_parser()):
        train_x, train_y = load_arrays(args.data_root, "train")
        test_x, test_y = load_arrays(args.data_root, "test")
    test = torch.from_numpy(test_x.copy())
    if args.canvas != IMAGE_SIZE:
        test = place_at_fixed_offsets(test, args.canvas)
    return Data(
        torch.from_numpy(train_x.copy()),
        torch.from_numpy(train_y.astype(np.int64)),
        test,
        torch.from_numpy(test_y.astype(np.int64)),
        min(args.eval_images or len(test), len(test)),
    )


@dataclass
class Progress:
    """What a run checkpoints after every epoch: its model and optimiser, the model's patch
    size, the epochs done, the time spent and the per-epoch records."""

    model: torch.nn.Module
    optimizer: torch.optim.AdamW
    patch: int
    done: int = 0
    elapsed: float = 0.0
    cpu_s: float = 0.0
    history: list[dict] = field(default_factory=list)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Add the wall and CPU time of the block to the run's."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.elapsed += time.perf_counter() - wall
        self.cpu_s += time.process_time() - cpu

    def record(self, record: dict) -> None:
        """Keep `record` in the history and print it."""
        self.history.append(record)
        print(json.dumps(record), flush=True)

    def state(self, args: argparse.Namespace) -> dict:
        """The checkpoint: everything a restarted run needs to go on bit for bit."""
        return {
            "epoch": self.done,
            "patch": self.patch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "elapsed_s": self.elapsed,
            "cpu_s": self.cpu_s,
            "history": self.history,
            "args": vars(args),
        }


def start(args: argparse.Namespace, patch: int) -> Progress:
    """A new run at `patch`: a seeded random model, or the --init one."""
    seed_everything(args.seed)
    model, elapsed, cpu_s, history = create(args, patch), 0.0, 0.0, []
    if args.init:
        model, elapsed, cpu_s, history = load_init(model, args.init, args)
    return Progress(model, make_optimizer(model, args), patch, 0, elapsed, cpu_s, history)


def resume(args: argparse.Namespace, path: Path) -> Progress:
    """The run saved at `path`, which must have been started with the same settings."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    ignored = ("fresh", "force")
    saved = {k: v for k, v in state["args"].items() if k not in ignored}
    now = {k: v for k, v in vars(args).items() if k not in ignored}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise SystemExit(
            f"{path} was written with different settings ({', '.join(diff)}); "
            "rerun the same command or pass --fresh"
        )
    model = create(args, state["patch"])
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(model, args)
    optimizer.load_state_dict(state["optimizer"])
    return Progress(
        model,
        optimizer,
        state["patch"],
        state["epoch"],
        state["elapsed_s"],
        state["cpu_s"],
        state["history"],
    )


class Trainer:
    """One run through the stages, checkpointed after every epoch."""

    def __init__(self, args: argparse.Namespace, data: Data) -> None:
        self.args, self.data = args, data
        self.bf16 = not args.no_bf16
        self.plan = stages(args)
        self.total_epochs = sum(stage.epochs for stage in self.plan)
        whole_batches = len(data.train_x) // args.batch_size  # the last partial one dropped
        self.steps_per_epoch = min(whole_batches, args.limit_steps or whole_batches)
        self.state_dir = Path(args.out) / ".train_state"
        self.resume_path = self.state_dir / "last.pt"

    def run(self) -> None:
        """Train (or resume), then write model.safetensors."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_path.exists() and not self.args.fresh:
            progress = resume(self.args, self.resume_path)
            done = f"{progress.done}/{self.total_epochs}"
            print(f"resumed from {self.resume_path} after epoch {done}", flush=True)
        else:
            progress = start(self.args, self.plan[0].patch)
        first = 0  # the run's index of the stage's first epoch
        for number, stage in enumerate(self.plan, 1):
            last = first + stage.epochs
            if progress.done < last:
                self.train_stage(progress, number, stage, range(max(progress.done, first), last))
            first = last
        self.finish(progress)

    def train_stage(self, progress: Progress, number: int, stage: Stage, epochs: range) -> None:
        """Train `epochs` of `stage`, moving the model to the stage's patch size first."""
        if progress.patch != stage.patch:
            self.repatch(progress, stage.patch)
        n_params = sum(p.numel() for p in progress.model.parameters())
        model = progress.model
        print(
            f"stage {number}/{len(self.plan)} {stage.name}: "
            f"{json.dumps(model_kwargs(self.args, stage.patch))} "
            f"tokens={model.patch_embed.num_patches + model.num_prefix_tokens} "
            f"params={n_params / 1e6:.3f}M bf16={self.bf16} threads={self.args.threads} "
            f"steps/epoch={self.steps_per_epoch}",
            flush=True,
        )
        first = epochs.stop - stage.epochs
        for epoch in epochs:
            self.train_epoch(progress, stage, epoch, epoch - first)
            if epoch + 1 == epochs.stop and number < len(self.plan):
                self.keep_stage_model(progress, stage)
            torch_save_whole(progress.state(self.args), self.resume_path)

    def repatch(self, progress: Progress, patch: int) -> None:
        """Resample the model to `patch`, with a new optimiser."""
        with progress.timed():
            progress.model = repatch(progress.model, self.args, patch)
            progress.patch = patch
            progress.optimizer = make_optimizer(progress.model, self.args)
            accuracy = self.data.monitor(progress.model, self.bf16)
        progress.record(
            {"event": f"repatch to {patch}", f"test{self.data.monitored}_acc": accuracy}
        )

    def train_epoch(self, progress: Progress, stage: Stage, epoch: int, in_stage: int) -> None:
        """One epoch (the run's `epoch`, the stage's `in_stage`), then its record."""
        started = time.perf_counter()
        with progress.timed():
            train_loss, train_acc = self.epoch_steps(progress, stage, epoch, in_stage)
            accuracy = self.data.monitor(progress.model, self.bf16)
        progress.done = epoch + 1
        progress.record(
            {
                "epoch": epoch + 1,
                "stage": stage.name,
                "patch": progress.patch,
                "train_loss": round(train_loss, 5),
                "train_acc": round(train_acc, 5),
                f"test{self.data.monitored}_acc": accuracy,
                "epoch_s": round(time.perf_counter() - started, 1),
                "elapsed_s": round(progress.elapsed, 1),
                "cpu_s": round(progress.cpu_s, 1),
            }
        )

    def epoch_steps(
        self, progress: Progress, stage: Stage, epoch: int, in_stage: int
    ) -> tuple[float, float]:
        """The epoch's optimiser steps; their mean training loss and accuracy."""
        args = self.args
        progress.model.train()
        # One generator per epoch: resuming at an epoch boundary reproduces the run.
        generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        torch.manual_seed(args.seed * 100_003 + epoch)  # drop-path randomness
        order = torch.randperm(len(self.data.train_x), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        where = f"({stage.name}, patch {progress.patch})"
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{self.total_epochs} {where}",
            mininterval=30,
            file=sys.stdout,
        )
        for step in bar:
            lr = self.learning_rate(stage, in_stage * self.steps_per_epoch + step)
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = self.augmented(batch, generator)
            at = f"epoch {epoch + 1}, step {step + 1}"
            loss, right = self.train_step(progress, images, self.data.train_y[batch], lr, at)
            loss_sum += loss * len(batch)
            correct += right
            seen += len(batch)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.2e}"
            )
        bar.close()
        return loss_sum / seen, correct / seen

    def learning_rate(self, stage: Stage, step: int) -> float:
        """The learning rate at the stage's `step`: warmup, then cosine decay."""
        total = stage.epochs * self.steps_per_epoch
        warmup = int(stage.warmup_epochs * self.steps_per_epoch)
        return lr_at(step, total, warmup, stage.lr, self.args.min_lr)

    def augmented(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training images at `batch`, cropped and flipped (and pasted on the canvas)."""
        args = self.args
        images = augment(self.data.train_x[batch], args.pad, not args.no_flip, generator)
        if args.canvas == IMAGE_SIZE:
            return images
        sizes = args.garment_sizes or (IMAGE_SIZE, IMAGE_SIZE)
        return paste_resized(images, args.canvas, sizes, generator)

    def train_step(
        self, progress: Progress, images: torch.Tensor, labels: torch.Tensor, lr: float, where: str
    ) -> tuple[float, int]:
        """One optimiser step at `lr`; the batch's mean loss and its correct predictions."""
        args, model, optimizer = self.args, progress.model, progress.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            tokens = model.forward_features(normalize(images))
            logits = model.forward_head(tokens)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        if args.token_label_weight:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                patch_logits = model.head(tokens[:, model.num_prefix_tokens :])
            garment = foreground_patches(images, progress.patch, args.foreground_threshold)
            loss = loss + args.token_label_weight * token_label_loss(patch_logits, labels, garment)
        value = finite_loss(loss.item(), where)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        return value, (logits.argmax(-1) == labels).sum().item()

    def keep_stage_model(self, progress: Progress, stage: Stage) -> None:
        """Save the model at the end of a stage before the last (the 7x7 one) for reference."""
        top1 = self.data.test_top1(progress.model)
        print(f"{stage.name} stage fp32 test top-1 (all {len(self.data.test_x)}): {top1:.4f}")
        progress.history.append({"event": f"end of {stage.name}", "test_top1": top1})
        save_model(
            self.state_dir / f"{stage.name}_model.safetensors",
            progress.model,
            self.args,
            progress.patch,
            {"test_top1": f"{top1:.4f}"},
        )

    def finish(self, progress: Progress) -> None:
        """Evaluate on every test image, write the model, drop the checkpoint."""
        top1 = self.data.test_top1(progress.model)
        print(f"final fp32 test top-1 on {len(self.data.test_x)} images: {top1:.4f}", flush=True)
        path = Path(self.args.out) / "model.safetensors"
        times = {"train_wall_s": f"{progress.elapsed:.0f}", "train_cpu_s": f"{progress.cpu_s:.0f}"}
        extra = {"test_top1": f"{top1:.4f}", "train_seed": self.args.seed, **times}
        save_model(path, progress.model, self.args, progress.patch, extra)
        write_text_whole(self.state_dir / "history.json", json.dumps(progress.history, indent=1))
        self.resume_path.unlink()  # finished: a rerun with --force trains again
        print(
            f"wrote {path}; training wall time {progress.elapsed / 60:.1f} min, "
            f"CPU time {progress.cpu_s / 60:.1f} min"
        )


def main(argv: list[str] | None = None) -> None:
    """Train (or resume), then write model.safetensors."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.fused_attn:
        # Plain q@k^T/softmax/@v is ~1.8x faster than the CPU flash-attention kernel at
        # 197 tokens; numerically the same model (loading later may use fused attention).
        timm.layers.set_fused_attn(False)
    Trainer(args, load_data(args)).run()


if __name__ == "__main__":
    main()
