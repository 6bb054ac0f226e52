"""RobustDiffusionLoss under torch.distributed: two CPU ranks (gloo) keep identical adaptive buckets, each
the mean over the ranks that saw the bucket of its per-rank median penalty."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from conftest import subprocess_pythonpath
from robust_diffusion.adaptive_scale import MAX_UPDATE_RATIO

NUM_BUCKETS = 5  # bucket k holds t in [200 k, 200 k + 200)
MOMENTUM = 0.5
WORLD_SIZE = 2
TIMEOUT_S = 240

# Buckets of each rank's samples, per step. Every (rank, bucket) count is odd, so its median is one sample.
# Bucket 0 only ever on rank 0, bucket 3 only on rank 1, buckets 1 and 2 on both, bucket 4 on neither.
RANK_BUCKETS = {
    0: [[0, 0, 0, 1, 2, 2, 2], [1, 1, 1, 2]],
    1: [[1, 1, 1, 2, 3, 3, 3], [2, 2, 2, 3, 1]],
}

WORKER = textwrap.dedent("""
    import datetime, sys
    import torch
    import torch.distributed as dist
    import robust_diffusion as rd

    rank, world_size, store, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    module = rd.RobustDiffusionLoss("hellinger", num_buckets=int(sys.argv[6]), momentum=float(sys.argv[7]))
    history = []
    for x, y, t in torch.load(data):
        module(x, y, t)
        history.append(module.adaptive_scale.bucket_penalty.clone())
    torch.save({"history": torch.stack(history), "skipped": int(module.adaptive_scale.skipped_updates)}, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def rank_data(rank):
    """Each rank's batches (x, y, t): per-sample errors of different sizes on the two ranks."""
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for buckets in RANK_BUCKETS[rank]:
        buckets = torch.tensor(buckets)
        t = buckets * 200 + torch.randint(0, 200, (len(buckets),), generator=g)
        x = torch.randn(len(buckets), 2, 5, 5, generator=g)
        size = (1.0 + rank) * torch.rand(len(buckets), generator=g).add(0.2).view(-1, 1, 1, 1)
        batches.append((x, x + size * torch.randn(x.shape, generator=g), t))
    return batches


def local_medians(x, y, t):
    """One rank's median penalty (mean squared error, float64) per bucket; NaN where it has no sample."""
    penalty = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    bucket = t * NUM_BUCKETS // 1000
    medians = torch.full((NUM_BUCKETS,), float("nan"), dtype=torch.float64)
    for k in range(NUM_BUCKETS):
        values = penalty[bucket == k].sort().values
        if len(values):
            medians[k] = values[len(values) // 2]
    return medians


def expected_history(data):
    """The buckets after each step: seeded from the first step's rank-averaged medians (a bucket no rank saw
    gets their median), then an EMA with the rank-averaged medians where some rank saw the bucket."""
    state, history = None, []
    for step in range(len(data[0])):
        medians = torch.stack([local_medians(*data[rank][step]) for rank in range(WORLD_SIZE)])
        seen = ~medians.isnan()
        mean = medians.nan_to_num().sum(0) / seen.sum(0).clamp_min(1)
        present = seen.any(0)
        if state is None:
            values = mean[present].sort().values
            fallback = values[(len(values) - 1) // 2]  # torch.nanmedian: the lower middle value
            state = torch.where(present, mean, fallback)
        else:  # later statistics are clamped to at most MAX_UPDATE_RATIO times the bucket before the EMA
            bounded = torch.minimum(mean, state * MAX_UPDATE_RATIO)
            state = torch.where(present, MOMENTUM * state + (1 - MOMENTUM) * bounded, state)
        history.append(state.clone())
    return torch.stack(history)


def run_ranks(tmp_path, data):
    """Run WORKER on every rank with its batches; returns each rank's saved result."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on the host's network setup
    procs = []
    try:
        for rank in range(WORLD_SIZE):
            torch.save(data[rank], tmp_path / f"data{rank}.pt")
            procs.append(subprocess.Popen(
                [sys.executable, str(worker), str(rank), str(WORLD_SIZE), str(tmp_path / "store"),
                 str(tmp_path / f"data{rank}.pt"), str(tmp_path / f"out{rank}.pt"), str(NUM_BUCKETS), str(MOMENTUM)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:  # never leave a rank waiting on its peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(tmp_path / f"out{rank}.pt") for rank in range(WORLD_SIZE)]


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed gloo")


@pytest.mark.slow
@needs_gloo
def test_two_ranks_keep_identical_buckets_averaged_over_the_ranks_that_saw_them(tmp_path):
    data = {rank: rank_data(rank) for rank in range(WORLD_SIZE)}
    got = [result["history"] for result in run_ranks(tmp_path, data)]
    assert torch.equal(got[0], got[1]), "the ranks' adaptive states diverged"
    expected = expected_history(data)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=0)

    # Not vacuous: the ranks' own medians differ, and a bucket seen by one rank takes that rank's median
    # (a mean over both ranks would halve it).
    first = [local_medians(*data[rank][0]) for rank in range(WORLD_SIZE)]
    assert not torch.allclose(first[0][1:3], first[1][1:3], rtol=0.1)
    torch.testing.assert_close(got[0][0, 0].double(), first[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[0][0, 3].double(), first[1][3], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[0][0, 1].double(), (first[0][1] + first[1][1]) / 2, rtol=1e-5, atol=0)
    assert got[0][1, 0] == got[0][0, 0], "a bucket no rank saw this step keeps its value"


@pytest.mark.slow
@needs_gloo
def test_a_non_finite_batch_on_one_rank_leaves_every_rank_with_the_same_state(tmp_path):
    """Rank 1's second batch overflows: its statistic is refused on every rank (counted once on each), rank 0's
    is taken in alone, and the ranks' states stay identical and finite."""
    data = {rank: rank_data(rank) for rank in range(WORLD_SIZE)}
    x, y, t = data[1][1]
    data[1][1] = (x, torch.full_like(y, float("inf")), t)
    results = run_ranks(tmp_path, data)
    assert torch.equal(results[0]["history"], results[1]["history"]), "the ranks' adaptive states diverged"
    assert torch.isfinite(results[0]["history"]).all()
    assert results[0]["skipped"] == results[1]["skipped"] == 1
    clean_only = {0: data[0], 1: data[1][:1]}
    state = expected_history({0: data[0][:1], 1: data[1][:1]})[-1]
    medians = local_medians(*clean_only[0][1])
    seen = ~medians.isnan()
    bounded = torch.minimum(medians, state * MAX_UPDATE_RATIO)
    expected = torch.where(seen, MOMENTUM * state + (1 - MOMENTUM) * bounded, state)
    torch.testing.assert_close(results[0]["history"][1].double(), expected, rtol=1e-5, atol=0)
