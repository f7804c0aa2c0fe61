import pytest

from stepdapo.errors import StageInputError
from stepdapo.training import per_device_batch, train_steps, training_args


def test_train_steps():
    assert train_steps(100, 16, 3.0) == 19  # ceil(100 / 16 * 3)
    assert train_steps(100, 16, 3.0, grad_accum=2) == 10
    assert train_steps(0, 16, 1.0) == 1


def test_training_args(tmp_path):
    common = dict(steps=40, batch_size=8, lr=1e-4, seed=3, progress=False, run_name="r")
    a = training_args(tmp_path, report_to=[], **common)
    assert a.report_to == [] and a.save_strategy == "no" and a.warmup_steps == 0
    assert (a.adam_beta1, a.adam_beta2, a.lr_scheduler_type) == (0.9, 0.999, "linear")
    assert (a.seed, a.data_seed, a.logging_steps, a.remove_unused_columns) == (3, 3, 2, False)
    b = training_args(tmp_path, report_to=["tensorboard"], grad_accum=2, warmup_ratio=0.1, adam_betas=(0.9, 0.95),
                      lr_scheduler="cosine", logs=10, checkpoints=4, use_cpu=True, **common)
    assert b.report_to == ["tensorboard"] and b.gradient_accumulation_steps == 2 and b.warmup_steps == 4
    assert (b.adam_beta2, b.lr_scheduler_type, b.logging_steps) == (0.95, "cosine", 4)
    assert (b.save_strategy, b.save_steps, b.save_total_limit, b.use_cpu) == ("steps", 10, 1, True)  # 40 steps // 4 checkpoints


def test_config_batch_sizes_are_global(monkeypatch):
    assert per_device_batch(16, "actor.states_per_batch") == 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert per_device_batch(16, "actor.states_per_batch") == 4
    for batch in (6, 2):  # not a multiple, fewer than the processes
        with pytest.raises(StageInputError, match=f"actor.states_per_batch = {batch} is the global batch.*multiple of 4"):
            per_device_batch(batch, "actor.states_per_batch")


def test_a_failed_training_still_ends_its_tracker_run(monkeypatch):
    """A stage whose training raises must not leave its wandb run open for the next stage."""
    from stepdapo import training

    ended = []
    monkeypatch.setattr(training, "finish_tracker_run", lambda report_to: ended.append(list(report_to)))

    class Broken:
        def train(self, resume_from_checkpoint=None):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        training.train_then_finish_trackers(Broken(), ["wandb"])
    assert ended == [["wandb"]]
