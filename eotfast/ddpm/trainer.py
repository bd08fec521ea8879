"""OT-paired conditional DDPM training: the model and its step (:class:`Trainer`), and the run
loop behind ``train.py`` (:func:`run`).

Each step draws a source batch and a target batch independently, pairs them with
:func:`eotfast.pair` on the training device inside the compiled step, and trains the U-Net to
denoise the paired target conditioned on its source: by default it predicts
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022); ``prediction="eps"``
makes it predict the noise. The options are :class:`~eotfast.ddpm.config.TrainConfig`'s,
checkpoint files are :mod:`~eotfast.ddpm.checkpoint`'s, and the metrics
:mod:`~eotfast.ddpm.evaluation`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from eotfast import available_backends, pair
from eotfast.ddpm.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from eotfast.ddpm.config import OT_CHOICES, ConfigError, TrainConfig, merge_for_resume
from eotfast.ddpm.data import DataError, DomainData, load_dataset
from eotfast.ddpm.diffusion import GaussianDiffusion
from eotfast.ddpm.distributed import (
    World,
    all_agree,
    barrier,
    gather_objects,
    join,
    launched_world,
    leave,
    mean_over_ranks,
)
from eotfast.ddpm.ema import EMA
from eotfast.ddpm.evaluation import Evaluator, save_grid, to_model_range
from eotfast.ddpm.unet import ConditionalUNet

__all__ = [
    "OT_CHOICES",
    "TrainConfig",
    "ConfigError",
    "Trainer",
    "CheckpointError",
    "TrainingDiverged",
    "load_checkpoint",
    "run",
    "evaluate_checkpoint",
]


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite; the last checkpoint is kept as it was."""


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """--device -> the device; under torchrun, each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and world is not None and world.distributed and device.index is None:
        device = torch.device("cuda", world.local_rank)
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision -> the autocast dtype of the U-Net (None: fp32)."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {device} does not support bfloat16; use fp32")
    return torch.bfloat16 if precision == "bf16" else None


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's own streams (data order, noise); rank 0 at step 0 is ``seed``."""
    return (seed + 1_000_003 * rank + 7_919 * step) % 2**63


def resolve_pairing(ot: str, device: torch.device) -> tuple[str, str, str]:
    """--ot -> (pair method, backend, the --ot value actually used). A Sinkhorn backend that
    cannot run on ``device`` falls back to sinkhorn_cpu, said in one line."""
    method, backend = OT_CHOICES[ot]
    if method == "sinkhorn" and backend != "auto":
        runnable = available_backends(device)
        if backend == "cpu" and "cpu" in available_backends("cpu"):
            return method, backend, ot  # on a GPU: pairs on host copies of the batch
        if backend not in runnable:
            print(
                f"--ot {ot}: backend {backend!r} cannot run on {device} here "
                f"(available: {', '.join(runnable)}); using sinkhorn_cpu",
                file=sys.stderr,
            )
            return method, "cpu", "sinkhorn_cpu"
    return method, backend, ot


class Autocast(nn.Module):
    """Runs a denoiser under autocast to ``dtype`` and returns its output in float32, so that
    the loss is reduced in float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_t.device.type, dtype=self.dtype):
            output = self.model(x_t, t, cond)
        return output.float()


class PairedDenoisingLoss(nn.Module):
    """The compiled part of a training step: pair, noise, predict, loss (backward is traced
    by AOTAutograd from this graph). Given the partners (global pairing, solved beside it),
    only noise, predict, loss."""

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        method: str,
        backend: str,
        reg: float,
        sampling: str,
        autocast: torch.dtype | None = None,
    ):
        super().__init__()
        self.model = model if autocast is None else Autocast(model, autocast)
        self.diffusion = diffusion
        self.method, self.backend, self.reg = method, backend, reg
        # --sampling is how a partner is taken from a plan's row: methods with a plan only.
        self.sampling = sampling if method in ("sinkhorn", "emd") else None

    def partners(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """The OT partner [B, C, H, W] of each source image among the targets (with a process
        group: among the targets of every process, :func:`eotfast.pair`'s ``group``), paired
        in float32."""
        x, y = source.float(), target.float()  # [B, C, H, W]: B samples of C*H*W features
        if self.backend == "cpu" and x.device.type != "cpu":
            x, y = x.cpu(), y.cpu()  # the C++ solver reads host memory: an explicit choice
        j, partner = pair(
            x,
            y,
            self.method,
            reg=self.reg,
            sampling=self.sampling,
            backend=self.backend,
            generator=generator,
            group=group,
            return_partners=True,
        )
        if group is None:  # the batch itself, indexed where it is: no images through the host
            return target[j.to(target.device)]
        return partner.to(target.device, target.dtype)  # from the gathered global batch

    def forward(
        self, source: torch.Tensor, target: torch.Tensor, partner: torch.Tensor | None = None
    ) -> torch.Tensor:
        if partner is None:
            partner = self.partners(source, target)
        return self.diffusion.training_loss(self.model, partner, cond=source)


class Trainer:
    """Everything a run holds, built from a :class:`TrainConfig`: data on the device, U-Net
    (wrapped in DistributedDataParallel under torchrun), EMA, diffusion, optimizer, scheduler,
    the (compiled) loss, and the evaluator.

    Each process draws its own batches, timesteps and noise from its own seed
    (:func:`rank_seed`); the model starts from the same weights everywhere. With the global
    OT scope, every process gathers the sources and targets of all processes, solves the same
    OT problem with the same generator (so the same partners everywhere), and trains on the
    partners of its own sources."""

    def __init__(
        self, config: TrainConfig, data: DomainData | None = None, world: World | None = None
    ):
        self.config = config = config.resolved()
        self.world = world = world or World()
        self.device = resolve_device(config.device, world)
        self.out_dir = Path(config.out_dir)
        self.method, self.backend, self.ot_used = resolve_pairing(config.ot, self.device)
        self.ot_scope = config.ot_scope
        if self.ot_scope == "auto":
            self.ot_scope = "global" if world.distributed else "local"
        # The global pairing's process group: the default one, or a gloo group beside it when
        # the pairing reads host copies of GPU batches (--ot sinkhorn_cpu), which NCCL cannot
        # gather. None pairs the local batch.
        self.pair_group = None
        if self.ot_scope == "global" and world.distributed:
            host_copies = self.backend == "cpu" and self.device.type != "cpu"
            self.pair_group = dist.new_group(backend="gloo") if host_copies else dist.group.WORLD
        self.autocast = resolve_precision(config.precision, self.device)

        torch.manual_seed(config.seed)  # the same initial weights on every process
        if data is None:
            data = load_dataset(
                config.dataset,
                config.data_root,
                config.image_size,
                config.source_digit,
                config.target_digit,
                config.seed,
            )
        check_splits(data)
        self.data = data
        self.train_source = data.train_source.to(self.device)  # uint8 [N, 3, H, W]
        self.train_target = data.train_target.to(self.device)

        self.model = ConditionalUNet(
            base_channels=config.base_channels,
            channel_mults=config.channel_mults,
            num_res_blocks=config.num_res_blocks,
            attention_levels=config.attention_levels,
            dropout=config.dropout,
        ).to(self.device)
        self.ema = EMA(self.model, decay=config.ema_decay)
        self.diffusion = GaussianDiffusion(config.timesteps, config.schedule, config.prediction)
        self.diffusion.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        warmup = max(config.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        trained = self.model
        if world.distributed:
            # torch.compile cannot trace DDP's forward from inside a compiled function: under
            # torchrun the U-Net is compiled under DDP, and pairing and loss run beside it.
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device] if self.device.type == "cuda" else None
            inner = torch.compile(self.model) if config.compile else self.model
            trained = DistributedDataParallel(inner, device_ids=device_ids)
        self.loss_fn = PairedDenoisingLoss(
            trained,
            self.diffusion,
            self.method,
            self.backend,
            config.reg,
            config.sampling,
            self.autocast,
        )
        self.step_fn = self.loss_fn
        if config.compile and not world.distributed:
            self.step_fn = torch.compile(self.loss_fn, fullgraph=True)
        self.evaluator = Evaluator(
            data, self.diffusion, self.device, config.sample_steps, config.batch_size, config.seed
        )
        self.step = 0
        self.seed_streams(rank_seed(config.seed, world.rank))

    def seed_streams(self, seed: int) -> None:
        """This process's data order and noise; the pairing draws, the same on every process."""
        if self.world.rank > 0:  # rank 0 (and a single process) continues torch's stream
            torch.manual_seed(seed)
        self.data_generator = torch.Generator().manual_seed(seed)
        pair_device = "cpu" if self.backend == "cpu" else self.device
        self.pair_generator = torch.Generator(pair_device).manual_seed(self.config.seed + 2)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent source and target batches (uniform, with replacement), [-1, 1]."""
        size = self.config.batch_size
        source_index = torch.randint(
            len(self.train_source), (size,), generator=self.data_generator
        ).to(self.device)
        target_index = torch.randint(
            len(self.train_target), (size,), generator=self.data_generator
        ).to(self.device)
        return (
            to_model_range(self.train_source[source_index]),
            to_model_range(self.train_target[target_index]),
        )

    def global_partners(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The partners of this process's sources in one OT problem over the global batch
        (``pair``'s ``group``: every process gathers the sources and targets, solves the same
        problem and keeps its own rows)."""
        return self.loss_fn.partners(
            source, target, generator=self.pair_generator, group=self.pair_group
        )

    def train_step(self, hold=contextlib.nullcontext) -> torch.Tensor:
        """One optimizer step: the one :func:`run`'s loop takes and the train_step benchmark
        times. Returns the loss, [] float32 on the device (no host sync).

        ``hold`` is a context manager around the update (``run`` passes
        :meth:`StopSignals.held`, so that a signal waits for the step's end)."""
        self.model.train()
        # -- batch: this process's source and target batches, drawn independently
        source, target = self.next_batch()  # [B, 3, H, W] each, float32 in [-1, 1]
        # -- pair + loss: the OT partner of each source, the denoising loss of the partner
        #    conditioned on its source. Local scope: pairing inside the compiled step_fn;
        #    global: one OT problem over every process's batch, solved beside it.
        partner = None
        if self.ot_scope == "global":
            partner = self.global_partners(source, target)  # [B, 3, H, W]
        loss = self.step_fn(source, target, partner)  # [], float32
        # -- update: the weights, AdamW state, schedule, EMA and step counter move together
        with hold():
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under torchrun, DDP averages the gradients over the processes
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(self.model)
            self.step += 1
        return loss.detach()

    def evaluate(self, num_images: int | None = None) -> tuple[dict, torch.Tensor]:
        """Metrics of the EMA model (see :class:`Evaluator`) and its sample grid."""
        metrics, grid = self.evaluator.evaluate(
            self.ema.module, num_images or self.config.eval_size
        )
        return {"step": self.step, **metrics}, grid

    # -------------------------------------------------------------- checkpoint state
    def rng_state(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "data": self.data_generator.get_state(),
            "pair": self.pair_generator.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def set_rng_state(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data"])
        if "pair" in rng:
            self.pair_generator.set_state(rng["pair"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state_dict(self, collective: bool = True) -> dict:
        """The checkpoint. Under torchrun, every process's RNG streams are gathered (a
        collective: every process calls it) unless ``collective`` is False (after Ctrl-C),
        when the others' streams are left out and a resume reseeds them."""
        rng = self.rng_state()
        if self.world.distributed:
            ranks = gather_objects(rng, self.world) if collective else None
            rng = {**rng, "ranks": ranks, "world_size": self.world.size}
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"the checkpoint's weights do not fit the model its config describes ({first_line})"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rng = state["rng"]
        saved_world = int(rng.get("world_size", 1))
        if saved_world == self.world.size and (saved_world == 1 or rng.get("ranks")):
            self.set_rng_state(rng["ranks"][self.world.rank] if saved_world > 1 else rng)
            return
        # Another number of processes, or a checkpoint written after Ctrl-C: the weights and
        # optimizer continue; each process's streams start afresh from (seed, rank, step).
        if self.world.is_main:
            print(
                f"resume: the checkpoint holds the random streams of {saved_world} process(es)"
                f"{'' if rng.get('ranks') or saved_world == 1 else ' (rank 0 only)'}; this "
                f"run has {self.world.size}: streams reseeded, training continues from step "
                f"{self.step}",
                file=sys.stderr,
            )
        seed = rank_seed(self.config.seed, self.world.rank, self.step)
        self.seed_streams(seed)
        torch.manual_seed(seed)
        if "pair" in rng:
            self.pair_generator.set_state(rng["pair"])

    def save(self, collective: bool = True) -> Path:
        """Writes the checkpoint (rank 0 alone); every process calls it under torchrun."""
        path = self.out_dir / CHECKPOINT_NAME
        state = self.state_dict(collective)
        if self.world.is_main:
            save_checkpoint(state, path)
        if collective:
            barrier(self.world)  # the file exists on return, on every process
        return path


def check_splits(data: DomainData) -> None:
    """Every split of the data must hold an image: found now, not after training."""
    for split in ("train_source", "train_target", "test_source", "test_target"):
        if len(getattr(data, split)) == 0:
            raise DataError(
                f"{data.name}: no images in the {split.replace('_', ' ')} split; the data set "
                f"needs images in both domains, for training and for a held-out test split"
            )


# The files a run writes in its folder (the samples go to samples/).
RUN_FILES = (CHECKPOINT_NAME, "config.json", "metrics.jsonl")


def prepare_out_dir(out_dir: Path) -> None:
    """Creates the run folder and checks that files can be written in it, before training:
    a folder in place of one of the run's files (checkpoint.pt) trained, then failed at the
    first checkpoint."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples").mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"--out-dir {out_dir} is not a writable folder ({reason})") from None
    for name in RUN_FILES:
        path = out_dir / name
        if path.exists() and not path.is_file():
            raise ConfigError(
                f"--out-dir {out_dir}: {name} is not a file (a folder?), and the run writes "
                f"{path}; move it away or choose another --out-dir"
            )


def finite_or_none(record: dict) -> dict:
    """JSON has no NaN: a non-finite metric is written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def write_json_line(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")


def run(
    config: TrainConfig,
    resume: bool = False,
    data: DomainData | None = None,
    progress: bool = True,
    given: Iterable[str] | None = None,
) -> dict:
    """Trains (or resumes) a run to ``config.steps`` and evaluates it; returns the final
    metrics (an empty dict on the processes other than rank 0 under torchrun). Interrupting
    (Ctrl-C) writes a checkpoint first.

    With ``resume``, the run in ``config.out_dir`` continues from its checkpoint: the options
    named in ``given`` (default: those that differ from TrainConfig's defaults) replace the
    saved ones where they may change (how long, how it executes and is observed); the saved
    data, model, optimizer, diffusion, pairing and seed are kept, and a different value given
    for one of them is reported in one line and ignored."""
    from tqdm import tqdm  # the "train" extra (pyproject.toml), imported where the bar is drawn

    # ---------------------------------------------------------------- 1. configuration
    world = launched_world()
    state = None  # the checkpoint a resumed run continues from
    if resume:
        given_names = config.non_default_fields() if given is None else set(given)
        config, state = resumed_config(config, given_names, world)
    config = config.resolved()
    out_dir = Path(config.out_dir)
    device = resolve_device(config.device, world)
    main = world.is_main  # rank 0 alone writes files and evaluates

    joined = join(device)  # under torchrun: the process group (NCCL on GPUs, gloo on CPUs)
    stop = StopSignals()  # Ctrl-C and SIGTERM end the loop below with a checkpoint
    trainer = None
    try:
        # ------------------------------------------------------------------- 2. build
        check_out_dir(out_dir, world, device)
        trainer = Trainer(config, data=data, world=world)
        if state is not None:
            trainer.load_state_dict(state)
        files = RunFiles(out_dir, config, trainer) if main else None  # writes config.json

        # -------------------------------------------------------------------- 3. loop
        bar = tqdm(
            total=config.steps,
            initial=trainer.step,
            disable=not (progress and main),
            dynamic_ncols=True,
            desc=f"{config.dataset} {trainer.ot_used}",
        )
        # [], the losses summed over the log window on the device: one host read per log line
        running_loss = torch.zeros((), device=trainer.device)
        window_steps, window_start = 0, time.perf_counter()
        with checkpoint_on_stop(trainer, stop, out_dir), bar:
            while trainer.step < config.steps:
                # -- step: batch, pair + loss, backward, clip, AdamW, schedule, EMA
                loss = trainer.train_step(hold=stop.held)  # [], float32
                running_loss += loss
                window_steps += 1
                bar.update(1)
                last = trainer.step == config.steps
                # -- log: the mean loss over the window and the processes (one host read)
                if trainer.step % config.log_every == 0 or last:
                    mean_loss = float(mean_over_ranks(running_loss, world) / window_steps)
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(
                            f"training diverged: the loss became {mean_loss} by step "
                            f"{trainer.step} (lower --lr or --grad-clip); the last checkpoint "
                            f"in {out_dir} is kept"
                        )
                    if main:
                        seconds = time.perf_counter() - window_start
                        files.log(
                            {
                                "kind": "train",
                                "step": trainer.step,
                                "loss": mean_loss,
                                "lr": trainer.scheduler.get_last_lr()[0],
                                "steps_per_s": window_steps / seconds,
                            }
                        )
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    running_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                # -- checkpoint (every process hands its random streams to rank 0)
                if trainer.step % config.checkpoint_every == 0 and not last:
                    trainer.save()
                # -- evaluate (rank 0; the others wait for it at the next step's gradients)
                evaluating = config.eval_every and trainer.step % config.eval_every == 0
                if evaluating and not last and main:
                    files.evaluate(trainer)

        # ----------------------------------------------------------------- 4. the end
        trainer.save()
        if not main:
            return {}
        metrics = files.evaluate(trainer)
        files.finish()
        return metrics
    finally:
        stop.restore()
        trainer = None  # DistributedDataParallel modules still alive at leave() abort the exit
        if joined:
            leave()


def resumed_config(config: TrainConfig, given: set[str], world: World) -> tuple[TrainConfig, dict]:
    """--resume: the config to continue with (the checkpoint's, with the options named in
    ``given`` that may change) and the checkpoint of the run in ``config.out_dir``."""
    out_dir = Path(config.out_dir or TrainConfig.default_out_dir(config.dataset, config.ot))
    state = load_checkpoint(out_dir / CHECKPOINT_NAME)
    config, ignored = merge_for_resume(state["config"], config, given | {"out_dir"})
    if ignored and world.is_main:
        print(
            f"--resume keeps the checkpoint's data, model, optimizer, diffusion, pairing "
            f"and seed; ignored: {', '.join(ignored)}",
            file=sys.stderr,
        )
    saved_step = int(state["step"])
    if config.steps < saved_step:
        raise ConfigError(
            f"--steps {config.steps} is below the checkpoint's step {saved_step}: "
            f"nothing to train; give --steps above {saved_step}, or --evaluate "
            f"{out_dir / CHECKPOINT_NAME}"
        )
    return config, state


def check_out_dir(out_dir: Path, world: World, device: torch.device) -> None:
    """:func:`prepare_out_dir` on rank 0 (which alone writes files); under torchrun, every
    process raises when it fails, instead of the others waiting in a collective."""
    error = None
    if world.is_main:
        try:
            prepare_out_dir(out_dir)
        except ConfigError as found:
            error = found
    if not all_agree(error is None, world, device):
        raise error or ConfigError(f"rank 0 cannot write to --out-dir {out_dir}")


class RunFiles:
    """What rank 0 writes in the run folder besides the checkpoint: ``config.json`` (the
    options and what they resolved to), ``metrics.jsonl`` (train and eval records, also sent
    to Weights & Biases unless --wandb disabled) and the sample grids in ``samples/``."""

    def __init__(self, out_dir: Path, config: TrainConfig, trainer: Trainer):
        self.out_dir = out_dir
        used = {"ot_used": trainer.ot_used, "device_used": str(trainer.device)}
        used.update(ot_scope_used=trainer.ot_scope, world_size=trainer.world.size)
        used["precision_used"] = "bf16" if trainer.autocast is torch.bfloat16 else "fp32"
        text = json.dumps({**config.to_dict(), **used}, indent=2)
        (out_dir / "config.json").write_text(text + "\n")
        self.wandb_run = None
        if config.wandb != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project="eotfast",
                config=config.to_dict(),
                mode=config.wandb,
                dir=str(out_dir),
                resume="allow",
                name=out_dir.name,
            )

    def log(self, record: dict) -> None:
        write_json_line(self.out_dir / "metrics.jsonl", record)
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in record.items() if k != "step"}, step=record["step"]
            )

    def evaluate(self, trainer: Trainer) -> dict:
        """The EMA model's metrics, logged, and its sample grid saved; returns the metrics."""
        metrics, grid = trainer.evaluate()
        save_grid(grid, self.out_dir / "samples" / f"step_{trainer.step:06d}.png")
        self.log({"kind": "eval", **metrics})
        return metrics

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


@contextlib.contextmanager
def checkpoint_on_stop(trainer: Trainer, stop: StopSignals, out_dir: Path):
    """Around the training loop: Ctrl-C, torchrun's SIGTERM, or an error, here or on another
    process (which shows here as a failed collective), ends the run with a checkpoint and a
    line saying why and where, and is raised on. Collectives fail in backward, before the
    optimizer step, or after the step is complete, and signals wait for the step's end
    (:meth:`StopSignals.held`), so the weights, optimizer and EMA are those of step
    ``trainer.step``: rank 0 writes them, without a collective. A diverged loss writes
    nothing: its weights are not worth keeping, the last checkpoint stays."""
    try:
        yield
    except TrainingDiverged:
        raise
    except BaseException as error:
        stop.stopping = True  # later signals cannot cut the checkpoint write short
        reason = (
            f"stopped by {error}" if isinstance(error, Stopped)
            else "interrupted" if isinstance(error, KeyboardInterrupt)
            else "stopped by an error"
        )  # fmt: skip
        try:
            path = trainer.save(collective=False)
            note = f"checkpoint written to {path}; continue with --resume --out-dir {out_dir}"
        except Exception as failure:  # the disk's or the device's: report the first error
            note = f"no checkpoint written ({type(failure).__name__}: {failure})"
        if trainer.world.is_main:
            print(f"\n{reason} at step {trainer.step}: {note}", file=sys.stderr)
        raise


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal: ``signum`` (SIGINT for Ctrl-C, SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (torchrun stopping its processes, a scheduler's preemption)
    as a request to stop the training loop, which then writes a checkpoint.

    The first signal raises :class:`Stopped` (a KeyboardInterrupt), except inside
    :meth:`held` (an optimizer step), where it waits for the step's end: raised between
    ``optimizer.step()`` and the step counter, it would save step k + 1's weights as step k.
    Once the loop is ``stopping``, later signals are ignored (a second Ctrl-C, or torchrun's
    SIGTERM, which followed another process's failure within 0.1 s in the 2-process test),
    so that they cannot cut the checkpoint write short. Installed from the main thread only
    (where Python runs handlers), and not over a signal the parent process set to be
    ignored."""

    def __init__(self):
        self.stopping = self.holding = False
        self.pending = None  # the signal that arrived inside held()
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self.previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum, frame):
        if self.stopping:
            return
        if self.holding:
            self.pending = signum
            return
        self.stopping = True
        raise Stopped(signum)

    @contextlib.contextmanager
    def held(self):
        """A signal arriving inside the block stops the loop after it."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None and not self.stopping:
            self.stopping = True
            raise Stopped(self.pending)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def evaluate_checkpoint(
    path: str | Path,
    num_images: int | None = None,
    data: DomainData | None = None,
    device: str | None = None,
) -> dict:
    """Metrics of a saved run's EMA model (the separate evaluation command); ``device``
    replaces the saved one (default: the saved one)."""
    state = load_checkpoint(path)
    overrides = {"compile": False, "out_dir": str(Path(path).parent)}
    if device is not None:
        overrides["device"] = device
    if num_images is not None:
        overrides["eval_size"] = num_images
    config, _ = merge_for_resume(state["config"], TrainConfig(**overrides), set(overrides))
    trainer = Trainer(config, data=data)
    trainer.load_state_dict(state)
    metrics, grid = trainer.evaluate()
    save_grid(grid, Path(path).with_suffix(".eval.png"))
    return metrics
