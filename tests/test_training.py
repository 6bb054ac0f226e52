"""The Trainer and the training CLI: exact resume (also after SIGKILL), DDP equivalence, logging, errors."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subprocess_pythonpath
from torch.utils.data import TensorDataset

import robust_diffusion as rd
from robust_diffusion.training import experiment, train_command
from robust_diffusion.training.data import contaminate, fashion_mnist_root
from robust_diffusion.training.checkpoint import load_state, save_state
from robust_diffusion.training.runlog import LOG_COLUMNS, read_log
from robust_diffusion.training.trainer import TrainConfig, Trainer
from robust_diffusion.training.trainer_checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
HAS_FASHION_MNIST = (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(not HAS_FASHION_MNIST, reason="dataset-fashion-mnist is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _micro_model(seed=0):
    torch.manual_seed(seed)
    return experiment.build_model("micro", 1)


def _toy_dataset(n=48, seed=0):
    images = torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return contaminate(images, 0.25, "noise", seed=seed)


def _trainer(tmp_path, steps, dataset=None, loss="hellinger", **config):
    dataset = dataset if dataset is not None else _toy_dataset()
    schedule = rd.NoiseSchedule.linear(100)
    settings = dict(steps=steps, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=3, progress=False)
    settings.update(config)
    return Trainer(_micro_model(), rd.RobustDiffusionLoss(loss, schedule, update="step"), dataset, schedule,
                   TrainConfig(**settings), out_dir=tmp_path)


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------- in process
def test_resume_is_exact_in_process(tmp_path):
    reference = _trainer(tmp_path / "full", steps=7).train()
    first = _trainer(tmp_path / "split", steps=3).train()  # stops at step 3 with a checkpoint
    resumed = _trainer(tmp_path / "split", steps=7)
    assert resumed.resume()
    assert resumed.step == first.step == 3
    resumed.train()
    _assert_states_equal(reference.model.state_dict(), resumed.model.state_dict())
    _assert_states_equal(reference.ema.state_dict(), resumed.ema.state_dict())
    _assert_states_equal(reference.loss_fn.state_dict(), resumed.loss_fn.state_dict())
    assert torch.equal(reference.influence.influence_sum, resumed.influence.influence_sum)
    full_log, split_log = read_log(reference.log_path), read_log(resumed.log_path)
    assert [r["step"] for r in full_log] == [2, 4, 6, 7]
    assert [r["step"] for r in split_log] == [2, 3, 4, 6, 7]  # the first session's last step logs too
    for a, b in zip(full_log[-2:], split_log[-2:]):  # everything but timing is identical
        for column in ("loss", "grad_norm", "influence_clean", "influence_contaminated"):
            assert a[column] == b[column] or (math.isnan(a[column]) and math.isnan(b[column])), column



def _labelled_dataset(n=48, seed=0, classes=3):
    images = torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return contaminate(images, 0.25, "noise", seed=seed, labels=torch.arange(n) % classes)


def _conditional_trainer(tmp_path, steps, classes=3, **config):
    torch.manual_seed(0)
    model = experiment.build_model("micro", 1, num_classes=classes)
    schedule = rd.NoiseSchedule.linear(100)
    settings = dict(steps=steps, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=3, progress=False,
                    conditional=True, label_dropout=0.25)
    settings.update(config)
    return Trainer(model, rd.RobustDiffusionLoss("ned", schedule, update="step"), _labelled_dataset(classes=classes),
                   schedule, TrainConfig(**settings), out_dir=tmp_path)


def test_conditional_training_passes_labels_with_dropout_and_resumes_exactly(tmp_path):
    """The dataset's labels reach the model, a seeded quarter of them replaced by the null label (3); a run
    stopped at a checkpoint and resumed ends bit for bit where an uninterrupted one does, dropped labels included."""
    seen = []

    def recording(trainer):
        forward = trainer.model.forward

        def forward_and_record(x, t, class_labels=None):
            seen.append(class_labels.clone())
            return forward(x, t, class_labels=class_labels)

        trainer.model.forward = forward_and_record
        return trainer

    reference = recording(_conditional_trainer(tmp_path / "full", steps=7)).train()
    full_labels = torch.cat(seen)
    dataset = reference.dataset
    assert full_labels.shape == (56,) and set(full_labels.tolist()) <= {0, 1, 2, 3}
    dropped = full_labels == 3
    assert 4 <= int(dropped.sum()) <= 24  # about a quarter of 56
    seen.clear()
    _conditional_trainer(tmp_path / "split", steps=3).train()
    resumed = recording(_conditional_trainer(tmp_path / "split", steps=7))
    assert resumed.resume() and resumed.step == 3
    resumed.train()
    assert torch.equal(torch.cat(seen), full_labels[24:])  # the same labels dropped after the resume
    _assert_states_equal(reference.model.state_dict(), resumed.model.state_dict())
    _assert_states_equal(reference.ema.state_dict(), resumed.ema.state_dict())
    assert torch.equal(reference.influence.influence_sum, resumed.influence.influence_sum)
    assert torch.equal(dataset.labels, torch.arange(48) % 3)
    with pytest.raises(ValueError, match="it was written with conditional=True, this run has False"):
        _trainer(tmp_path / "split", steps=9, dataset=_labelled_dataset()).resume()


def test_relabel_trains_on_the_new_labels_and_a_resume_keeps_them(tmp_path):
    """Labels changed mid-run (a class, or the null label: the image then trains only the unconditional model)
    reach the model from the next step, are saved in the checkpoint, and a resume continues on them; a checkpoint
    whose labels were tampered with is refused before anything is loaded."""
    seen = []
    new_labels = torch.arange(48) % 4  # 3 is the null label of a 3-class model

    def run(folder, steps, relabel_at=None):
        trainer = _conditional_trainer(folder, steps=steps, label_dropout=0.0)
        forward = trainer.model.forward
        trainer.model.forward = lambda x, t, class_labels=None: seen.append(class_labels.clone()) or forward(
            x, t, class_labels=class_labels)
        if relabel_at is not None:
            trainer.config.steps = relabel_at
            trainer.train()
            trainer.relabel(new_labels)
            trainer.config.steps = steps
        return trainer.train()

    reference = run(tmp_path / "full", 6, relabel_at=3)
    after = torch.cat(seen[3:])
    assert 3 in after.tolist() and set(after.tolist()) <= {0, 1, 2, 3}
    assert 3 not in torch.cat(seen[:3]).tolist()  # before it, the dataset's labels 0..2 (no dropout)
    seen.clear()
    part = run(tmp_path / "split", 3, relabel_at=3)  # relabelled at its end; its checkpoint holds the new labels
    part.save_checkpoint()
    resumed = _conditional_trainer(tmp_path / "split", steps=6, label_dropout=0.0)
    assert resumed.resume() and torch.equal(resumed.labels.cpu(), new_labels) and resumed.relabelled
    assert read_checkpoint(tmp_path / "full" / "checkpoint.safetensors")["labels"] is not None
    # a run never relabelled leaves the labels to its dataset (a corrected labels file then counts on resume)
    _conditional_trainer(tmp_path / "plain_conditional", steps=3).train()
    assert read_checkpoint(tmp_path / "plain_conditional" / "checkpoint.safetensors")["labels"] is None
    resumed.train()
    _assert_states_equal(reference.model.state_dict(), resumed.model.state_dict())
    # refusals: an unconditional run, labels that are not one class or null label per sample, a tampered file
    with pytest.raises(ValueError, match="relabel changes a conditional run's class labels"):
        _trainer(tmp_path / "plain", 2).relabel(new_labels)
    with pytest.raises(ValueError, match=r"relabel: labels lie in \[0, 4\], the model has 3 classes \(labels 0..2 "
                                         r"and the null label 3\)"):
        resumed.relabel(torch.arange(48) % 5)
    with pytest.raises(ValueError, match=r"relabel: labels must be integers, one per sample \[48\]"):
        resumed.relabel(torch.zeros(48))
    path = tmp_path / "split" / "checkpoint.safetensors"
    state = load_state(path, "robust_diffusion.training checkpoint", 1)
    state["labels"] = torch.full((48,), 7)
    save_state(state, path, "robust_diffusion.training checkpoint", 1)
    fresh = _conditional_trainer(tmp_path / "split", steps=6, label_dropout=0.0)
    before = [p.clone() for p in fresh.model.parameters()]
    with pytest.raises(ValueError, match=r"cannot resume from .*: its labels lie in \[7, 7\]"):
        fresh.resume()
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.model.parameters()))


def test_conditional_training_refuses_what_does_not_fit():
    schedule = rd.NoiseSchedule.linear(100)
    loss = rd.RobustDiffusionLoss("ned", schedule, update="step")
    config = TrainConfig(steps=2, batch_size=8, progress=False, conditional=True)
    torch.manual_seed(0)
    conditional = experiment.build_model("micro", 1, num_classes=3)
    with pytest.raises(ValueError, match=r"TrainConfig.conditional needs a class-conditional model: "
                                         r"UNet\(num_classes=K\)"):
        Trainer(_micro_model(), loss, _labelled_dataset(), schedule, config)
    with pytest.raises(ValueError, match=r"TrainConfig.conditional needs a dataset with a `labels` \[N\] tensor"):
        Trainer(conditional, loss, _toy_dataset(), schedule, config)
    with pytest.raises(ValueError, match=r"labels lie in \[0, 4\], the model has 3 classes \(labels 0..2\): build "
                                         r"it with num_classes=5"):
        Trainer(conditional, loss, _labelled_dataset(classes=5), schedule, config)
    with pytest.raises(ValueError, match=r"the model is class-conditional \(3 classes and a null label\): set "
                                         r"TrainConfig.conditional=True"):
        Trainer(conditional, loss, _labelled_dataset(), schedule, TrainConfig(steps=2, batch_size=8, progress=False))
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match=r"TrainConfig.label_dropout must be a probability in \[0, 1\)"):
            TrainConfig(conditional=True, label_dropout=bad)
    with pytest.raises(ValueError, match="TrainConfig.guidance_scale must be a finite number >= 0"):
        TrainConfig(conditional=True, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="TrainConfig.guidance_scale guides a class-conditional model's samples"):
        TrainConfig(guidance_scale=2.0)


def test_stop_ends_training_after_the_current_step_with_a_checkpoint(tmp_path):
    """Trainer.stop(), called while a step runs (as from another thread or a signal handler), ends train() after
    that step with a checkpoint there; resuming continues to the same state as an uninterrupted run. A stop
    asked before train() makes it return at once, and the request is used up."""
    reference = _trainer(tmp_path / "full", steps=7).train()
    stopped = _trainer(tmp_path / "split", steps=7)
    loss_fn = stopped.loss_fn
    forward = loss_fn.forward

    def forward_that_stops(*args, **kwargs):
        if stopped.step == 4:  # during the fifth step (steps count from 0): not a checkpoint step
            stopped.stop()
        return forward(*args, **kwargs)

    loss_fn.forward = forward_that_stops
    stopped.train()
    assert stopped.step == 5
    assert read_checkpoint(tmp_path / "split" / "checkpoint.safetensors")["step"] == 5
    resumed = _trainer(tmp_path / "split", steps=7)
    assert resumed.resume() and resumed.step == 5
    resumed.stop()
    resumed.train()  # asked before it started: no step
    assert resumed.step == 5
    resumed.train()  # the request was used up: trains to the end
    assert resumed.step == 7
    _assert_states_equal(reference.model.state_dict(), resumed.model.state_dict())
    _assert_states_equal(reference.ema.state_dict(), resumed.ema.state_dict())
    assert torch.equal(reference.influence.influence_sum, resumed.influence.influence_sum)

def test_log_and_influence_statistics(tmp_path):
    dataset = _toy_dataset()
    trainer = _trainer(tmp_path, steps=12, dataset=dataset, checkpoint_every=0).train()
    rows = read_log(trainer.log_path)
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    ceiling = 1 / trainer.loss_fn.typical_influence  # weights read relative to a typical sample's (1)
    assert all(0 < r["influence_mean"] <= ceiling and r["loss"] > 0 and r["penalty"] > 0 for r in rows)
    assert any(r["influence_mean"] > 0.7 for r in rows)  # about 1 for these clean samples, not the raw 0.44
    mean, count = trainer.average_influence()
    # 12 steps x 8 samples over 48 samples (drop_last epochs of 6 batches): each seen exactly twice.
    assert torch.equal(count, torch.full((48,), 2.0, dtype=torch.float64))
    assert ((mean > 0) & (mean <= ceiling)).all()
    assert (tmp_path / "checkpoint.safetensors").is_file()  # the last step always writes one


@pytest.mark.parametrize("loss", ["hellinger", "plain mse"])
def test_a_step_with_non_finite_gradients_is_skipped_not_applied(tmp_path, loss):
    """Without a GradScaler (float32, bfloat16) nothing else stops a NaN gradient: AdamW would write it into the
    weights, its moments and the EMA for good. The Trainer skips such a step, counts it in log.csv and warns;
    training goes on from the weights before it, and the adaptive scale does not take in that batch."""
    trainer = _trainer(tmp_path, steps=8, checkpoint_every=0)
    if loss == "plain mse":  # a loss without state of its own
        trainer = Trainer(_micro_model(), lambda output, target, t: torch.nn.functional.mse_loss(output, target),
                          _toy_dataset(), rd.NoiseSchedule.linear(100),
                          TrainConfig(steps=8, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=0,
                                      progress=False), out_dir=tmp_path)
    forward, before_step = trainer.network.forward, {}

    def forward_with_a_bad_step(x, t):
        before_step[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        output = forward(x, t)
        return output * math.nan if trainer.step == 4 else output

    trainer.network.forward = forward_with_a_bad_step
    with pytest.warns(RuntimeWarning, match=r"step 6: skipped 1 optimizer step\(s\) since the last log row"):
        trainer.train()
    _assert_states_equal(before_step[4], before_step[5])  # the bad step changed nothing
    assert not all(torch.equal(before_step[5][k], before_step[6][k]) for k in before_step[5])  # the next one did
    states = [("model", trainer.model.state_dict()), ("ema", trainer.ema.state_dict())]
    if loss == "hellinger":
        states.append(("loss_fn", trainer.loss_fn.state_dict()))
    for name, state in states:
        for key, value in state.items():
            assert torch.isfinite(value.double()).all(), f"{name}.{key}"
    for group in trainer.optimizer.state.values():
        assert all(torch.isfinite(v).all() for v in group.values() if isinstance(v, torch.Tensor))
    assert [(r["step"], r["steps_skipped"]) for r in read_log(trainer.log_path)] == [(2, 0), (4, 0), (6, 1), (8, 0)]
    if loss == "hellinger":
        assert int(trainer.loss_fn.adaptive_scale.skipped_updates) == 1  # the scale's state dropped the bad batch's statistic


def test_data_order_is_independent_of_contamination_choice():
    dataset = _toy_dataset(n=200)
    schedule = rd.NoiseSchedule.linear(100)
    trainer = Trainer(_micro_model(), rd.RobustDiffusionLoss("kl", schedule, update="step"), dataset, schedule,
                      TrainConfig(steps=1, batch_size=50, progress=False))
    order = torch.tensor(list(trainer.sampler))
    per_batch = dataset.is_contaminated[order].view(4, 50).sum(1)
    assert per_batch.min() > 0 and per_batch.max() < 50  # the same seed must not give the same permutation


def test_plain_dataset_and_plain_loss(tmp_path):
    images = torch.rand(16, 1, 12, 12) * 2 - 1
    schedule = rd.NoiseSchedule.linear(50)
    def mse(output, target, t):  # any callable loss_fn(output, target, t)
        return torch.nn.functional.mse_loss(output, target)

    trainer = Trainer(_micro_model(), mse, TensorDataset(images), schedule,
                      TrainConfig(steps=2, batch_size=8, log_every=1, progress=False), out_dir=tmp_path)
    trainer.train()
    rows = read_log(trainer.log_path)
    assert rows[-1]["influence_mean"] == 1.0 and math.isnan(rows[-1]["influence_contaminated"])
    assert math.isnan(rows[-1]["penalty"])  # only a RobustDiffusionLoss reports per-sample penalties


def test_risk_free_training(tmp_path):
    images = torch.rand(32, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # Risk 0 everywhere: the risk-free loss is the standard one, bit for bit.
    clean = contaminate(images, 0.25, "noise", seed=0)
    standard = _trainer(tmp_path / "a", steps=3, dataset=clean, checkpoint_every=0).train()
    risk_free = _trainer(tmp_path / "b", steps=3, dataset=clean, checkpoint_every=0, risk_free=True).train()
    _assert_states_equal(standard.model.state_dict(), risk_free.model.state_dict())
    # Known Gaussian noise: trains, influence weights logged for clean and noisy samples.
    noisy = contaminate(images, 0.25, "gaussian", seed=0, noise_std=0.3)
    trainer = _trainer(tmp_path / "c", steps=4, dataset=noisy, risk_free=True).train()
    row = read_log(trainer.log_path)[-1]
    assert 0 < row["influence_clean"] <= 1 and 0 < row["influence_contaminated"] <= 1
    with pytest.raises(ValueError, match="needs a dataset with a per-sample `risk` tensor"):
        _trainer(tmp_path / "d", steps=1, dataset=TensorDataset(images), risk_free=True)


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state({"a": torch.ones(3)}, path, "test", 1)
    save_state({"a": torch.zeros(3)}, path, "test", 1)
    assert torch.equal(load_state(path, "test", 1)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_resume_removes_the_temporary_file_of_a_killed_checkpoint_write(tmp_path):
    """SIGKILL in the middle of atomic_write skips its cleanup: the half-written temporary file stays next to the
    intact checkpoint until resume() deletes it (and only it: a live writer's temporary file is kept)."""
    first = _trainer(tmp_path, steps=3).train()
    checkpoint = first.checkpoint_path
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from robust_diffusion.training import checkpoint\n"
        "def slow_fsync(fd):\n"
        "    print('writing', flush=True); time.sleep(600)\n"
        "os.fsync = slow_fsync\n"
        f"checkpoint.atomic_write(b'half a checkpoint', {str(checkpoint)!r})\n")],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait()
    stale = tmp_path / f".checkpoint.safetensors.tmp{writer.pid}"
    assert stale.read_bytes() == b"half a checkpoint"
    live = tmp_path / ".checkpoint.safetensors.tmp1"  # pid 1 always runs
    live.write_bytes(b"")
    stale_log = tmp_path / ".log.csv.tmp999999999"  # no such process
    stale_log.write_text("step\n")
    resumed = _trainer(tmp_path, steps=6)
    assert resumed.resume() and resumed.step == 3  # the intact checkpoint, not the torn write
    assert not stale.exists() and not stale_log.exists() and live.exists()
    live.unlink()
    resumed.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "log.csv"]


def test_mse_is_the_standard_mse_and_kl_the_adaptive_one():
    schedule = rd.NoiseSchedule.linear()
    x, y = torch.randn(6, 1, 5, 5), torch.randn(6, 1, 5, 5)
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    mse = experiment.build_loss("mse", schedule, scale="adaptive", temperature=0.5)  # scale arguments do not apply to it
    assert mse.loss == "kl" and mse.scale_mode == "fixed" and mse.fixed_scale == 1.0
    torch.testing.assert_close(mse(x, y, t), torch.nn.functional.mse_loss(x, y))
    assert experiment.build_loss("kl", schedule).scale_mode == "adaptive"
    assert experiment.build_loss("mse+debias", schedule).uses_weighting


def test_config_and_trainer_errors():
    with pytest.raises(ValueError, match="TrainConfig.steps must be a positive integer, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainConfig(mixed_precision="fp8")
    schedule = rd.NoiseSchedule.linear(50)
    with pytest.raises(ValueError, match="fp16.* needs a CUDA device"):
        Trainer(_micro_model(), torch.nn.functional.mse_loss, TensorDataset(torch.zeros(8, 1, 8, 8)), schedule,
                TrainConfig(batch_size=4, mixed_precision="fp16"), device="cpu")
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        Trainer(_micro_model(), torch.nn.functional.mse_loss, TensorDataset(torch.zeros(8, 1, 8, 8)), schedule,
                TrainConfig(batch_size=16))


def test_resume_rejects_a_different_batch_size(tmp_path):
    _trainer(tmp_path, steps=3).train()
    other = _trainer(tmp_path, steps=6, batch_size=4)
    with pytest.raises(ValueError, match="written with batch_size=8, this run has 4"):
        other.resume()


# ---------------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, message", [
    (["--data-root", "/nonexistent/fashion"], "Fashion-MNIST directory not found: /nonexistent/fashion"),
    (["--contamination", "1.5"], "contamination must be a fraction in [0, 1), got 1.5"),
    (["--contamination", "-0.1"], "contamination must be a fraction in [0, 1), got -0.1"),
    (["--loss", "l2"], "unknown loss 'l2' in 'l2'; expected one of mse, diffusers_huber, kl, hellinger, ned"),
    (["--loss", "ned+snr"], "unknown or repeated suffix 'snr' in loss 'ned+snr'"),
    (["--loss", "ned+debias+min_snr"], "unknown or repeated suffix 'min_snr' in loss 'ned+debias+min_snr'"),
    (["--scale", "big"], "scale must be 'adaptive', 'vlb', 'batch' or a non-negative number, got 'big'"),
    (["--dataset", "cifar10"], "CIFAR-10 needs --data-root"),
])
def test_cli_errors_are_clear(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train_command.main(["--out", str(tmp_path), "--steps", "1"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_api_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST directory not found"):
        experiment.load_experiment_data("fashion-mnist", 0.3, root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST file not found"):
        experiment.load_experiment_data("fashion-mnist", 0.3, root=tmp_path)  # exists, but holds no IDX files
    with pytest.raises(ValueError, match=r"contamination must be a fraction in \[0, 1\), got 1"):
        experiment.load_experiment_data("fashion-mnist", 1)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; expected one of fashion-mnist, cifar10"):
        experiment.load_experiment_data("mnist", 0.3)
    with pytest.raises(ValueError, match="unknown contamination kind 'salt'"):
        experiment.load_experiment_data("fashion-mnist", 0.3, "salt")
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        experiment.build_loss("l2", rd.NoiseSchedule.linear())
    assert experiment.parse_loss_name("ned+debias") == ("ned", "debias", False, False, False, False)
    assert experiment.parse_loss_name("kl+risk_free+debias").name == "kl+debias+risk_free"
    assert experiment.parse_loss_name("ned+trust") == ("ned", "constant", False, True, False, False)
    assert experiment.parse_loss_name("kl+coherent+trust").name == "kl+trust+coherent"
    with pytest.raises(ValueError, match=r"\+coherent gates the per-sample trust; write \+trust\+coherent"):
        experiment.parse_loss_name("ned+coherent")
    with pytest.raises(ValueError, match=r"weighs samples by kl's own influence weights, which are all 1"):
        experiment.parse_loss_name("kl+risk_free+trust")
    # trust on a loss whose weights are all 1 is measured by NED; a divergence measures itself
    measure = experiment.build_influence_loss("pseudo_huber+trust", rd.NoiseSchedule.linear(), temperature=0.25)
    assert (measure.loss, measure.temperature) == (experiment.TRUST_MEASURE, 0.25)
    assert experiment.build_influence_loss("ned+trust", rd.NoiseSchedule.linear()) is None
    assert experiment.build_influence_loss("mse", rd.NoiseSchedule.linear()) is None
    assert experiment.parse_loss_name("ned+normalized+trust").name == "ned+trust+normalized"
    assert experiment.build_loss("ned+normalized", rd.NoiseSchedule.linear()).normalize_influence
    with pytest.raises(ValueError, match=r"\+normalized divides by the batch's mean influence weight, which is 1 for mse"):
        experiment.build_loss("mse+normalized", rd.NoiseSchedule.linear())
    assert experiment.parse_loss_name("ned+trust+debias+risk_free").name == "ned+debias+risk_free+trust"
    for bad in ("ned+trust+trust", "ned+risk_free+risk_free", "ned+debias+p2", "ned+truth"):
        with pytest.raises(ValueError, match=r"unknown or repeated suffix '(trust|risk_free|p2|truth)' in loss"):
            experiment.parse_loss_name(bad)
    assert experiment.build_loss("ned+debias", rd.NoiseSchedule.linear()).uses_weighting


@needs_fashion_mnist
def test_experiment_data_kinds():
    data = experiment.load_experiment_data("fashion-mnist", 0.25, "dataset", num_train=400)
    assert data.image_shape == (1, 28, 28) and data.train.num_contaminated == 100
    held_out = set(experiment._HELD_OUT_CLASSES)
    assert not held_out & set(data.train_labels.tolist()) and not held_out & set(data.test_labels.tolist())
    assert data.num_classes == 8 and torch.equal(data.train.labels, data.train_labels)  # Bag, Ankle boot: 8 and 9
    noisy = experiment.load_experiment_data("fashion-mnist", 0.1, "gaussian", num_train=100, image_size=32)
    assert noisy.image_shape == (1, 32, 32) and noisy.train.risk.max() == 0.5
    assert noisy.num_classes == 10 and torch.equal(noisy.train.labels, noisy.train_labels)


# ---------------------------------------------------------------------------------------------- subprocesses
def _cli_args(out, steps, extra=()):
    return ["--out", str(out), "--model", "micro", "--num-train", "96", "--contamination", "0.3", "--batch-size", "8",
            "--steps", str(steps), "--lr", "1e-3", "--log-every", "5", "--checkpoint-every", "5", "--threads", "1",
            "--no-progress", *extra]


@needs_fashion_mnist
@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    # A conditional run's exact resume (its dropped labels included) is checked in process, by
    # test_conditional_training_passes_labels_with_dropout_and_resumes_exactly; one killed process is enough here.
    steps = 60
    command = [sys.executable, "-m", "robust_diffusion.train"]
    subprocess.run(command + _cli_args(tmp_path / "reference", steps), env=_env(), check=True,
                   capture_output=True, timeout=600)

    out = tmp_path / "killed"
    process = subprocess.Popen(command + _cli_args(out, steps), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    checkpoint = out / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = read_checkpoint(checkpoint)  # never torn: it loads
    killed_at = state["step"]
    assert 5 <= killed_at < steps and killed_at % 5 == 0

    resumed = subprocess.run(command + _cli_args(out, steps, ["--resume"]), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint} at step {killed_at}" in resumed.stdout

    final, expected = read_checkpoint(checkpoint), read_checkpoint(tmp_path / "reference" / "checkpoint.safetensors")
    assert final["step"] == expected["step"] == steps
    for key in ("model", "ema", "loss_fn"):
        _assert_states_equal(final[key], expected[key])
    for group_a, group_b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        _assert_states_equal(group_a, group_b)
    assert torch.equal(final["influence"]["influence_sum"], expected["influence"]["influence_sum"])
    log = read_log(out / "log.csv")
    assert [r["step"] for r in log] == list(range(5, steps + 1, 5))  # no lost or duplicated rows
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(tmp_path / "reference" / "log.csv")]


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("objective", [[], ["--objective", "flow", "--shift", "3", "--timestep-sampling",
                                            "logit_normal"], ["--conditional", "--label-dropout", "0.25"]],
                         ids=["ddpm", "flow", "conditional"])
def test_two_process_ddp_matches_single_process(tmp_path, objective):
    # conditional: each rank takes its samples' labels and its rows of the global batch's label dropout, so the
    # two processes train what one does.
    # A fixed scale: the adaptive scale's per-bucket medians are averaged over ranks, not global medians.
    extra = ["--loss", "hellinger", "--scale", "1.0", "--checkpoint-every", "0"] + objective
    steps = "6"
    single = subprocess.run([sys.executable, "-m", "robust_diffusion.train",
                             *_cli_args(tmp_path / "single", steps, extra)],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "robust_diffusion.train", *_cli_args(tmp_path / "ddp", steps, extra)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    a = read_checkpoint(tmp_path / "single" / "checkpoint.safetensors")
    b = read_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors")
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert ("class_embed.weight" in a["model"]) == ("--conditional" in objective)
    # Adam moves a weight by up to lr (1e-3) per step whatever its gradient's size, so where a gradient is near 0
    # the all-reduce's summation order shows in the weight: flow's run has such weights (9e-6 seen, 2 of them);
    # 2e-5 is 2% of one step.
    atol = 2e-5 if "flow" in objective else 1e-6
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=atol, msg=key)
    # Every rank's influence weights reach the statistics: the same samples were seen the same number of times.
    for key in ("influence_count", "bucket_influence_count", "penalty_count"):
        assert torch.equal(a["influence"][key], b["influence"][key]), key
    for key in ("influence_sum", "bucket_influence_sum", "penalty_sum"):
        torch.testing.assert_close(b["influence"][key], a["influence"][key], rtol=1e-5, atol=1e-6, msg=key)
    rows_a, rows_b = read_log(tmp_path / "single" / "log.csv"), read_log(tmp_path / "ddp" / "log.csv")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for column in ("loss", "penalty", "influence_clean", "influence_contaminated"):
            assert ra[column] == pytest.approx(rb[column], rel=1e-4), column


# ---------------------------------------------------------------------------------------------- flow matching
def _flow_trainer(tmp_path, steps, loss="ned", schedule=None, **config):
    schedule = schedule or rd.FlowMatchingSchedule(shift=2.0, timestep_sampling="logit_normal")
    settings = dict(steps=steps, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=3, progress=False)
    settings.update(config)
    return Trainer(_micro_model(), rd.RobustDiffusionLoss(loss, schedule, update="step"), _toy_dataset(), schedule,
                   TrainConfig(**settings), out_dir=tmp_path)


def test_flow_matching_trains_tracks_log_snr_buckets_and_resumes_exactly(tmp_path):
    calls = []
    reference = _flow_trainer(tmp_path / "full", 7, sample_trust=True, influence_from_step=2)
    forward = reference.loss_fn.forward
    reference.loss_fn.forward = lambda output, target, t, weight=None: calls.append(t) or forward(  # noqa: E731
        output, target, t, weight)
    reference.train()
    assert all(t.dtype == torch.float32 and bool(((t >= 0) & (t <= 1)).all()) for t in calls)
    tracker = reference.influence
    assert tracker.num_timesteps is None and tracker.counts().sum() == 5 * 8  # steps 2..6
    assert torch.isfinite(torch.tensor([r["loss"] for r in read_log(reference.log_path)])).all()
    # The buckets the tracker filed the draws under are the loss's own log-SNR buckets.
    expected = torch.zeros(10)
    for t in calls[2:]:
        expected += torch.bincount(reference.loss_fn.buckets(t), minlength=10)
    assert torch.equal(tracker.counts(per_bucket=True).sum(0).float(), expected)
    first = _flow_trainer(tmp_path / "split", 3, sample_trust=True, influence_from_step=2).train()
    resumed = _flow_trainer(tmp_path / "split", 7, sample_trust=True, influence_from_step=2)
    assert resumed.resume() and first.step == 3
    resumed.train()
    _assert_states_equal(reference.model.state_dict(), resumed.model.state_dict())
    for name, buffer in reference.influence.named_buffers():
        assert torch.equal(buffer, getattr(resumed.influence, name)), name


def test_gradient_accumulation_takes_the_same_step_in_micro_batches(tmp_path):
    """batch_size is the optimizer step's batch; gradient_accumulation_steps splits it into micro-batches that see
    the same samples, timesteps and noise, so with a loss that keeps no running state the weights match one pass
    (up to the order float sums take); the influence statistics count the same draws."""
    def run(name, parts, loss="mse"):
        schedule = rd.NoiseSchedule.linear(100)
        loss_fn = experiment.build_loss(loss, schedule)
        return Trainer(_micro_model(), loss_fn, _toy_dataset(), schedule,
                       TrainConfig(steps=4, batch_size=8, gradient_accumulation_steps=parts, lr=1e-3, log_every=2,
                                   progress=False), out_dir=tmp_path / name).train()

    one, two, four = run("one", 1), run("two", 2), run("four", 4)
    for split in (two, four):
        for key, value in one.model.state_dict().items():
            torch.testing.assert_close(split.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(split.influence.counts(), one.influence.counts())
        assert [row["loss"] for row in read_log(split.log_path)] == pytest.approx(
            [row["loss"] for row in read_log(one.log_path)], rel=1e-5)
    adaptive = run("adaptive", 2, loss="ned")  # the adaptive scale averages the micro-batches' medians
    assert bool(adaptive.loss_fn.adaptive_scale.initialized) and adaptive.step == 4
    with pytest.raises(ValueError, match=r"batch_size 8 must be divisible by the number of data-parallel ranks \(1\) "
                                         r"times gradient_accumulation_steps \(3\)"):
        _trainer(tmp_path / "bad", 1, gradient_accumulation_steps=3)


def test_tensorboard_gets_the_log_rows_the_scale_and_sample_grids(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = _trainer(tmp_path, steps=4, report_to="tensorboard", sample_every=2, loss="ned").train()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                                size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "influence/mean", "influence/clean",
            "influence/contaminated", "faults/scale_skipped", "faults/scale_limited", "faults/steps_skipped",
            "scale/bucket_0", "scale/bucket_9"} <= scalars, scalars
    rows = read_log(trainer.log_path)
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4]
    assert [event.value for event in events.Scalars("train/loss")] == pytest.approx([row["loss"] for row in rows])
    assert events.Scalars("scale/bucket_3")[-1].value == pytest.approx(
        float(trainer.loss_fn.adaptive_scale.bucket_penalty[3]))
    grids = events.Images("samples")
    assert [grid.step for grid in grids] == [2, 4] and grids[0].width > 12 and grids[0].height > 12
    with pytest.raises(ValueError, match=r"sample_every draws sample grids for TensorBoard: set report_to"):
        TrainConfig(sample_every=2)
    with pytest.raises(ValueError, match=r"report_to must be one of \(None, 'tensorboard'\), got 'wandb'"):
        TrainConfig(report_to="wandb")
    args = train_command.build_parser().parse_args(["--out", "x", "--report-to", "tensorboard", "--sample-every", "5"])
    assert (args.report_to, args.sample_every) == ("tensorboard", 5)


def test_tensorboard_grid_of_a_conditional_model_has_a_row_per_class(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = dict(report_to="tensorboard", sample_every=2)
    _trainer(tmp_path / "plain", steps=2, **board).train()
    _conditional_trainer(tmp_path / "classes", steps=2, classes=5, guidance_scale=2.0, **board).train()
    sizes = {}
    for name in ("plain", "classes"):
        events = event_accumulator.EventAccumulator(str(tmp_path / name / "tensorboard"),
                                                    size_guidance={event_accumulator.IMAGES: 0})
        events.Reload()
        grid = events.Images("samples")[-1]
        sizes[name] = (grid.height, grid.width)
    # 12x12 images in rows of 8: two rows unconditional, one per class (5) conditional.
    assert sizes == {"plain": (2 * 12, 8 * 12), "classes": (5 * 12, 8 * 12)}


def test_bfloat16_autocast_trains_on_the_cpu(tmp_path):
    trainer = _trainer(tmp_path / "bf16", steps=3, mixed_precision="bf16")
    assert trainer.autocast_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    trainer.train()
    assert all(math.isfinite(row["loss"]) for row in read_log(trainer.log_path))
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' needs a CUDA device \(its grad scaler\), the "
                                         r"trainer runs on cpu: use 'bf16'"):
        _trainer(tmp_path / "fp16", steps=1, mixed_precision="fp16")


def test_every_weighting_scheme_and_its_parameters_reach_the_cli(tmp_path, capsys):
    from robust_diffusion.weighting import WEIGHTING_SCHEMES

    assert set(experiment.LOSS_WEIGHTINGS) == set(WEIGHTING_SCHEMES) - {"constant"}
    flow = experiment.build_schedule("flow", 3.0)
    for scheme in ("sigma_sqrt", "cosmap"):
        assert experiment.build_loss(f"ned+{scheme}", flow).uses_weighting
    schedule = rd.NoiseSchedule.linear()
    t = torch.tensor([0, 100, 500, 999])
    gamma2 = experiment.build_loss("mse+min_snr", schedule, weighting_params={"gamma": 2.0})
    torch.testing.assert_close(gamma2.timestep_weight[t], rd.loss_weights(schedule, t, "min_snr", gamma=2.0))
    assert not torch.allclose(gamma2.timestep_weight[t], rd.loss_weights(schedule, t, "min_snr"))
    args = train_command.build_parser().parse_args(["--out", "x", "--weighting-param", "gamma=2",
                                                    "--weighting-param", "k=1"])
    assert dict(args.weighting_param) == {"gamma": 2.0, "k": 1.0}
    for argv, message in ((["--weighting-param", "gamma"], r"--weighting-param: must be NAME=NUMBER, e.g. gamma=5"),
                          (["--weighting-param", "gamma=5"], r"weighting parameters \['gamma'\] need a weighting: "
                                                             r"name one in the loss, e.g. hellinger\+min_snr")):
        with pytest.raises(SystemExit):
            train_command.main(["--out", str(tmp_path), "--steps", "1", "--model", "micro"] + argv)
        assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


def test_trainer_refuses_a_loss_that_commits_its_scale_at_the_forward_pass_and_leaves_it_unchanged():
    """The Trainer needs the adaptive state committed after the optimizer step (a skipped step must leave no trace):
    it says how to build such a loss rather than changing the user's module."""
    schedule = rd.NoiseSchedule.linear()
    loss_fn = rd.RobustDiffusionLoss("ned", schedule)
    with pytest.raises(ValueError, match=r"build it with RobustDiffusionLoss\(\.\.\., update='step'\)"):
        Trainer(_micro_model(), loss_fn, _toy_dataset(), schedule, TrainConfig(steps=1, batch_size=8, progress=False))
    assert loss_fn.adaptive_scale.update == "forward"
    fixed = rd.RobustDiffusionLoss("ned", schedule, scale=1.0)  # no adaptive state: nothing to commit
    Trainer(_micro_model(), fixed, _toy_dataset(), schedule, TrainConfig(steps=1, batch_size=8, progress=False))


def test_flow_matching_refusals_name_the_problem(tmp_path):
    flow = rd.FlowMatchingSchedule()
    with pytest.raises(ValueError, match=r"the Trainer trains a discrete NoiseSchedule or flow matching .*EDMSchedule"):
        Trainer(_micro_model(), rd.RobustDiffusionLoss("ned", rd.EDMSchedule()), _toy_dataset(), rd.EDMSchedule(),
                TrainConfig(steps=1, batch_size=8, progress=False))
    with pytest.raises(ValueError, match=r"loss_fn was built for a discrete schedule, the Trainer's is "
                                         r"FlowMatchingSchedule"):
        Trainer(_micro_model(), rd.RobustDiffusionLoss("ned"), _toy_dataset(), flow,
                TrainConfig(steps=1, batch_size=8, progress=False))
    with pytest.raises(ValueError, match=r"risk_free=True: the Trainer's risk-free training draws integer steps"):
        _flow_trainer(tmp_path, 1, schedule=flow, risk_free=True)
    with pytest.raises(ValueError, match=r"Trainer: prediction_type 'v_prediction' is defined for VP processes"):
        Trainer(_micro_model(), rd.RobustDiffusionLoss("ned", flow, update="step"), _toy_dataset(), flow,
                TrainConfig(steps=1, batch_size=8, progress=False), prediction_type="v")


def test_cli_trains_flow_matching_and_refuses_what_it_cannot_do(tmp_path, capsys):
    assert train_command.main(["--dataset", "folder", "--data-root", str(_npy(tmp_path)), "--objective", "flow", "--shift",
                     "3", "--timestep-sampling", "logit_normal", "--loss", "diffusers_huber", "--model", "micro",
                     "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress",
                     "--threads", "1", "--export"]) == 0
    assert "# process flow" in (tmp_path / "run" / "model.schedule.txt").read_text()  # the C++ sampler's input
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["objective"] == "flow" and args["shift"] == 3.0
    assert experiment.build_schedule("flow", 3.0, "logit_normal").shift == 3.0
    # Resuming that run as DDPM is refused (the checkpoint names its schedule), and its args.json stays the run's.
    with pytest.raises(SystemExit):
        train_command.main(["--dataset", "folder", "--data-root", str(_npy(tmp_path)), "--loss", "diffusers_huber", "--model",
                  "micro", "--steps", "4", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress",
                  "--resume"])
    assert "it trained with a FlowMatchingSchedule, this run has a NoiseSchedule" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "args.json").read_text())["objective"] == "flow"
    for argv, message in [(["--shift", "3"], "--shift and --timestep-sampling apply to --objective flow only"),
                          (["--objective", "flow", "--kind", "gaussian", "--contamination", "0.2", "--loss",
                            "ned+risk_free"], r"\+risk_free trains DDPM steps")]:
        with pytest.raises(SystemExit):
            train_command.main(["--dataset", "folder", "--data-root", str(_npy(tmp_path)), "--model", "micro", "--steps", "1",
                      "--batch-size", "8", "--out", str(tmp_path / "bad"), "--no-progress"] + argv)
        assert re.search(message, " ".join(capsys.readouterr().err.split())), message


def test_cli_trains_a_conditional_model_on_npz_labels_and_refuses_what_it_cannot(tmp_path, capsys):
    path = tmp_path / "labelled.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=(rng.random((24, 12, 12)) * 255).astype(np.uint8), labels=np.arange(24) % 4)
    common = ["--dataset", "folder", "--data-root", str(path), "--model", "micro", "--batch-size", "8", "--no-progress",
              "--threads", "1"]
    assert train_command.main(common + ["--conditional", "--label-dropout", "0.2", "--steps", "2",
                                        "--out", str(tmp_path / "run"), "--export"]) == 0
    output = capsys.readouterr().out
    assert "conditional on 4 classes" in output and "exported: " in output
    state = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert state["config"]["conditional"] and state["config"]["label_dropout"] == 0.2
    assert state["model"]["class_embed.weight"].shape[0] == 5  # four classes and the null label
    # The export takes the labels (export_model checked both programs against the EMA model) and says how many.
    header = (tmp_path / "run" / "model.schedule.txt").read_text()
    assert "# num_classes 4\n# null_label 4\n" in header
    assert (tmp_path / "run" / "model.torchscript.pt").is_file() and (tmp_path / "run" / "model.pt2").is_file()
    args = train_command.build_parser().parse_args(["--out", "x"])
    assert (args.conditional, args.label_dropout, args.guidance_scale) == (False, 0.1, 1.0)
    for argv, message in [(["--conditional", "--data-root", str(_npy(tmp_path))],
                           r"--conditional needs class labels, and .*images.npy has none"),
                          (["--guidance-scale", "2"], r"guidance_scale guides a class-conditional model's samples: set "
                                                      r"conditional=True \(--conditional\)"),
                          (["--conditional", "--label-dropout", "1"],
                           r"label_dropout must be a probability in \[0, 1\)"),
                          (["--guidance-scale", "-1"], r"--guidance-scale: must be a non-negative number")]:
        with pytest.raises(SystemExit) as exit_info:
            train_command.main(common + ["--steps", "1", "--out", str(tmp_path / "bad")] + argv)
        assert exit_info.value.code == 2
        assert re.search(message, " ".join(capsys.readouterr().err.split())), message


def _npy(tmp_path):
    path = tmp_path / "images.npy"
    if not path.is_file():
        np.save(path, (np.random.default_rng(0).random((24, 12, 12)) * 255).astype(np.uint8))
    return path


# ---------------------------------------------------------------------------------------------- trust's noise levels
def test_trust_low_noise_sets_the_draws_trust_is_measured_on_and_binds_a_resume(tmp_path):
    seen = []
    trainer = _trainer(tmp_path / "quarter", 6, sample_trust=True, trust_low_noise=0.25, influence_from_step=1)
    trust = trainer.influence.trust
    trainer.influence.trust = lambda indices=None, **kw: seen.append(kw.get("low_noise")) or trust(indices, **kw)
    trainer.train()
    assert seen and set(seen) == {0.25}
    del trainer.influence.trust
    # the weights it trained with are the tracker's trust at t < T/4, which differs from the default's
    assert not torch.equal(trainer.influence.trust(low_noise=0.25), trainer.influence.trust())
    with pytest.raises(ValueError, match=r"it was written with trust_low_noise=0.25, this run has 0.5"):
        _trainer(tmp_path / "quarter", 8, sample_trust=True, influence_from_step=1).resume()
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="trust_low_noise must be a fraction of the timesteps in"):
            TrainConfig(sample_trust=True, trust_low_noise=bad)
    with pytest.raises(ValueError, match="trust_low_noise sets the draws the per-sample trust is measured on"):
        TrainConfig(trust_low_noise=0.25)
