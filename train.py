"""Train an OT-paired conditional DDPM for unpaired image-to-image translation.

    python train.py                                    # colored digits 2 -> 3, offline, CPU ok
    python train.py --dataset shoes2bags --data-root data --ot sinkhorn_triton
    python train.py --resume --out-dir runs/digits-sinkhorn   # continue a run where it stopped
    python train.py --evaluate runs/digits-sinkhorn/checkpoint.pt

Every step draws a source and a target batch independently, pairs them by mini-batch optimal
transport (eotfast.pair, inside the compiled step), and trains the U-Net to denoise each
target conditioned on its source partner. The library code is eotfast/ddpm/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from eotfast.ddpm.data import DATASETS, DataError
from eotfast.ddpm.diffusion import PREDICTIONS, SCHEDULES
from eotfast.ddpm.trainer import OT_CHOICES, CheckpointError, TrainConfig, evaluate_checkpoint, run

DEFAULTS = TrainConfig()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"must be comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def build_parser() -> argparse.ArgumentParser:
    # Defaults are SUPPRESSed: only the options given on the command line reach the config,
    # so a resumed run keeps its saved settings unless told otherwise.
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    add = parser.add_argument
    add("--dataset", choices=DATASETS, help=f"data set (default {DEFAULTS.dataset})")
    add("--data-root", help="folder with the data set's files (default ./data)")
    add("--out-dir", help="run folder (default runs/{dataset}-{ot})")
    add(
        "--image-size",
        type=positive_int,
        help="pixels per side (default: digits 16, cmnist 32, shoes2bags/folders 64)",
    )
    add("--source-digit", type=int, help="digits/cmnist source class (default 2)")
    add("--target-digit", type=int, help="digits/cmnist target class (default 3)")
    add(
        "--ot",
        choices=tuple(OT_CHOICES),
        help="pairing: Sinkhorn on a backend, exact "
        "assignment, POT's emd, or random (default sinkhorn: the device's fastest backend)",
    )
    add("--reg", type=positive_float, help=f"Sinkhorn epsilon / std(cost) (default {DEFAULTS.reg})")
    add("--sampling", choices=("sample", "argmax"), help="partner from a plan row")
    add("--steps", type=positive_int, help=f"optimizer steps (default {DEFAULTS.steps})")
    add("--batch-size", type=positive_int, help=f"default {DEFAULTS.batch_size}")
    add("--lr", type=positive_float, help=f"peak learning rate (default {DEFAULTS.lr})")
    add("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    add("--warmup-steps", type=nonnegative_int, help=f"default {DEFAULTS.warmup_steps}")
    add("--grad-clip", type=positive_float, help=f"default {DEFAULTS.grad_clip}")
    add("--ema-decay", type=unit_interval, help=f"default {DEFAULTS.ema_decay}")
    add("--base-channels", type=positive_int, help=f"default {DEFAULTS.base_channels}")
    add("--channel-mults", type=int_tuple, help="e.g. 1,2,2 (default)")
    add("--num-res-blocks", type=positive_int, help=f"default {DEFAULTS.num_res_blocks}")
    add("--attention-levels", type=int_tuple, help="e.g. 2 (default); empty for none")
    add("--dropout", type=unit_interval, help="default 0")
    add("--timesteps", type=positive_int, help=f"diffusion steps (default {DEFAULTS.timesteps})")
    add("--schedule", choices=SCHEDULES, help=f"default {DEFAULTS.schedule}")
    add("--prediction", choices=PREDICTIONS, help=f"network target (default {DEFAULTS.prediction})")
    add("--sample-steps", type=positive_int, help=f"DDIM steps (default {DEFAULTS.sample_steps})")
    add("--eval-every", type=nonnegative_int, help="steps between evaluations (0: at the end)")
    add("--eval-size", type=positive_int, help=f"default {DEFAULTS.eval_size}")
    add("--checkpoint-every", type=positive_int, help=f"default {DEFAULTS.checkpoint_every}")
    add("--log-every", type=positive_int, help=f"default {DEFAULTS.log_every}")
    add("--no-compile", dest="compile", action="store_false", help="run the step eagerly")
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add("--seed", type=int, help="default 0")
    add("--wandb", choices=("disabled", "offline", "online"), help="default disabled")
    add("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    add("--evaluate", metavar="CHECKPOINT", help="only evaluate a checkpoint and print metrics")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume, checkpoint = args.pop("resume", False), args.pop("evaluate", None)
    progress = args.pop("progress", True)
    if args.get("image_size") is not None and args.get("channel_mults") is not None:
        factor = 2 ** (len(args["channel_mults"]) - 1)
        if args["image_size"] % factor:
            parser.error(
                f"--image-size must be divisible by {factor} for "
                f"--channel-mults {args['channel_mults']}"
            )
    try:
        if checkpoint is not None:
            metrics = evaluate_checkpoint(checkpoint, args.get("eval_size"))
        else:
            config = dataclasses.replace(DEFAULTS, **args)
            metrics = run(config, resume=resume, progress=progress)
    except (DataError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
