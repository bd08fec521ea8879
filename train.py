"""Train an OT-paired conditional DDPM for unpaired image-to-image translation.

    python train.py                                    # colored digits 2 -> 3, offline, CPU ok
    python train.py --dataset shoes2bags --data-root data --ot sinkhorn_triton
    python train.py --resume --out-dir runs/digits-auto   # continue a run where it stopped
    python train.py --evaluate runs/digits-auto/checkpoint.pt

Every step draws a source and a target batch independently, pairs them by mini-batch optimal
transport (eotfast.pair, inside the compiled step), and trains the U-Net to denoise each
target conditioned on its source partner. The options are the fields of TrainConfig
(eotfast/ddpm/config.py); the library code is eotfast/ddpm/. An option whose default reads
"per data set" takes the value listed for --dataset unless it is given.

With --resume, the options given change how long the run goes, how it executes and how it is
observed; the data, model, optimizer, diffusion, pairing and seed stay the checkpoint's (a
different value given for one of them is reported and ignored), and options not given keep
their saved values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys

# Ctrl-C while torch and the library load (about 1.5 s) ends the program as it does later on
# (main: exit 130, one line at most), not with a KeyboardInterrupt traceback.
try:
    import torch

    from eotfast.ddpm.checkpoint import CheckpointError
    from eotfast.ddpm.config import (
        PER_DATASET_OPTIONS,
        ConfigError,
        TrainConfig,
        bounds_text,
        example_value,
        flag,
        per_dataset_text,
    )
    from eotfast.ddpm.data import DataError
    from eotfast.ddpm.distributed import launched_world
    from eotfast.ddpm.trainer import TrainingDiverged, evaluate_checkpoint, finite_or_none, run
except KeyboardInterrupt:
    sys.exit(128 + signal.SIGINT)

# What the command line adds to TrainConfig's fields (not saved with a run).
COMMAND_OPTIONS = ("resume", "evaluate", "progress")
# The options --evaluate takes from the command line; the rest comes from the checkpoint.
EVALUATE_OPTIONS = ("eval_size", "device")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"must be comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def default_text(field: dataclasses.Field) -> str:
    if "default_help" in field.metadata:
        return field.metadata["default_help"]
    if field.name in PER_DATASET_OPTIONS:
        return per_dataset_text(field.name)
    if isinstance(field.default, tuple):
        return ",".join(str(v) for v in field.default) or "none"
    return str(field.default)


def build_parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field: its help text, type and choices come from the field.
    Defaults are SUPPRESSed: only the options given reach the config, so a resumed run keeps
    its saved settings unless told otherwise."""
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    for field in dataclasses.fields(TrainConfig):
        meta, help_text = field.metadata, field.metadata["help"]
        if meta.get("cli") == "negate":
            parser.add_argument(
                f"--no-{field.name.replace('_', '-')}",
                dest=field.name,
                action="store_false",
                help=f"do not {help_text[0].lower()}{help_text[1:]}",
            )
            continue
        allowed = bounds_text(meta)
        allowed = f"; in {allowed}" if allowed else ""
        kwargs = {"help": f"{help_text} (default: {default_text(field)}{allowed})"}
        example = example_value(field)  # per-data-set options: digits' value
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        elif isinstance(example, tuple):
            kwargs.update(type=int_tuple, metavar="N,N,...")
        elif isinstance(example, float):
            kwargs["type"] = float
        elif isinstance(example, int) or field.type.startswith("int"):
            kwargs["type"] = int
        parser.add_argument(flag(field.name), **kwargs)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir from its checkpoint"
    )
    parser.add_argument(
        "--evaluate", metavar="CHECKPOINT", help="only evaluate a checkpoint and print metrics"
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    resume, checkpoint = args.pop("resume", False), args.pop("evaluate", None)
    progress = args.pop("progress", True)
    try:
        config = TrainConfig(**args)  # validates every value given
        if checkpoint is not None:
            ignored = [flag(name) for name in sorted(set(args) - set(EVALUATE_OPTIONS))]
            if ignored or resume:
                print(
                    f"--evaluate takes the checkpoint's settings but --eval-size and --device; "
                    f"ignored: {', '.join(ignored + ['--resume'] * resume)}",
                    file=sys.stderr,
                )
            metrics = evaluate_checkpoint(
                checkpoint, args.get("eval_size"), device=args.get("device")
            )
        else:  # run: configuration, build, the loop of Trainer.train_step, the end
            metrics = run(config, resume=resume, progress=progress, given=set(args))
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as error:
        print(f"{rank_prefix()}error: {error}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        text = str(error)
        out_of_memory = ("allocate memory", "not enough memory", "out of memory")
        if isinstance(error, RuntimeError) and not any(s in text for s in out_of_memory):
            raise
        first_line = text.splitlines()[0] if text else type(error).__name__
        print(f"{rank_prefix()}error: out of memory ({first_line}); lower --image-size or "
              f"--batch-size", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt as stop:  # the shell's convention: 128 + the signal's number
        return 128 + getattr(stop, "signum", signal.SIGINT)
    if metrics:  # under torchrun, rank 0's
        print(json.dumps(finite_or_none(metrics), indent=2, allow_nan=False))
    return 0


def rank_prefix() -> str:
    world = launched_world()
    return f"[rank {world.rank}] " if world.distributed else ""


if __name__ == "__main__":
    sys.exit(main())
