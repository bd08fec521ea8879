"""train_step: one optimizer step of the trainer, Trainer.train_step, the step train.py's loop
takes (its default digits configuration), with OT pairing inside the compiled step and without
it (random partners), so that the share of the step spent pairing shows. Also times the pair
call alone on the step's batch.

Target: pairing under 2% of the step with the machine's fastest backend (pair_share).
Compilation happens in the warm-up rounds, outside the timing.
"""

import time

import pytest
from _bench_utils import median_s, record

import eotfast
from eotfast.ddpm.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def digits_data():
    from eotfast.ddpm.data import load_dataset

    config = TrainConfig().resolved()
    return load_dataset("digits", None, config.image_size)


@pytest.mark.parametrize("ot_choice", ["sinkhorn", "exact", "random"])
def test_train_step(benchmark, digits_data, ot_choice, tmp_path):
    config = TrainConfig(ot=ot_choice, out_dir=str(tmp_path))
    trainer = Trainer(config, data=digits_data)
    source, target = trainer.next_batch()
    start = time.perf_counter()
    for _ in range(3):  # compiles
        trainer.train_step()
    warmup_s = time.perf_counter() - start

    benchmark.pedantic(trainer.train_step, rounds=20, iterations=1)
    pair_times = []
    for _ in range(20):
        begin = time.perf_counter()
        eotfast.pair(source, target, ot_choice)  # [B, 3, 16, 16]: samples first
        pair_times.append(time.perf_counter() - begin)
    pair_ms = 1e3 * sorted(pair_times)[len(pair_times) // 2]
    step_ms = 1e3 * median_s(benchmark)
    record(benchmark, "train_step", f"step, --ot {ot_choice}", config.batch_size,
           source[0].numel(), 1, steps_per_s=1e3 / step_ms, pair_ms=pair_ms,
           pair_share=pair_ms / step_ms, warmup_s=warmup_s)  # fmt: skip
