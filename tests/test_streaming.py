"""Training sets larger than memory: shard files read on demand, each DDP rank its own part, resume exact."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.data.tensors import load_split
from pipeline.errors import DataError
from pipeline.io import write_json, write_split
from pipeline.training.config import resolve
from pipeline.training.distributed import DistInfo
from pipeline.training.loop import Trainer
from pipeline.training.sampler import Sampler, choose_placement, epoch_order

SMALL = {"batch_size": 32, "ngf": 8, "ndf": 8, "nz": 8, "log_every": 2, "grid_every": 100, "eval_every": 100,
         "checkpoint_every": 100}


def _numbered_set(directory: Path, n: int, *, shard_bytes: int = 320) -> None:
    """n images of shape (2, 4, 4) whose first two bytes spell their index; shards of 10 images."""
    images = np.zeros((n, 2, 4, 4), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    entry = write_split(directory, "train", images, np.arange(n, dtype=np.int64), shard_bytes=shard_bytes)
    write_json(directory / "meta.json", {"splits": {"train": entry}, "num_classes": 0})


def _ids(x: torch.Tensor) -> list[int]:
    flat = x.reshape(len(x), -1).long()
    return (flat[:, 0] + 256 * flat[:, 1]).tolist()


def _sampler(directory: Path, rank: int = 0, world: int = 1, batch: int = 8) -> Sampler:
    data = load_split(directory, "train", mmap=True)
    return Sampler(data.images, torch.from_numpy(data.labels), batch_size=batch, nz=4, num_classes=0, seed=3,
                   device=torch.device("cpu"), info=DistInfo(rank, world, rank), placement="stream")


def _draw(s: Sampler) -> list[int]:
    d = s.indices()
    ids = _ids(d["x"])
    assert d["y"].tolist() == ids  # labels travel with their images
    s.release()
    return ids


def test_each_rank_reads_only_its_part_of_each_epochs_permutation(tmp_path: Path) -> None:
    n, b = 100, 8
    _numbered_set(tmp_path, n)
    ranks = [_sampler(tmp_path, r, 2, b) for r in range(2)]
    per_epoch = (n // 2) // b  # 6 batches of 8 out of each rank's 50 images
    seen = [[_draw(s) for _ in range(2 * per_epoch)] for s in ranks]
    for r, s in enumerate(ranks):
        for e in range(2):
            got = sorted(i for batch in seen[r][e * per_epoch : (e + 1) * per_epoch] for i in batch)
            own = epoch_order(n, seed=3, epoch=e, rank=r, world_size=2)
            assert got == sorted(own[: per_epoch * b].tolist())
            # Rank r's part is positions r, r + 2, ... of one permutation of the whole set.
            assert own.tolist() == epoch_order(n, seed=3, epoch=e)[r::2].tolist()
        s.close()
        # What it trained on plus the batches the prefetcher had read ahead: about half the set an
        # epoch, never the whole set.
        assert 2 * per_epoch * b <= s.images.rows_read <= (2 * per_epoch + s.prefetch.slots) * b < 2 * n
    first = [set(i for batch in seen[r][:per_epoch] for i in batch) for r in range(2)]
    assert not first[0] & first[1], "two ranks read the same image in one epoch"
    assert seen[0][:per_epoch] != seen[0][per_epoch:], "every epoch has its own order"


def test_a_restored_sampler_continues_with_the_same_batches(tmp_path: Path) -> None:
    _numbered_set(tmp_path, 60)
    straight = _sampler(tmp_path)
    expected = [_draw(straight) for _ in range(17)]  # 7 batches an epoch: crosses two epoch ends
    first = _sampler(tmp_path)
    head = [_draw(first) for _ in range(5)]
    state = first.state_dict()
    first.close()
    resumed = _sampler(tmp_path)
    resumed.load_state_dict(state)
    assert head + [_draw(resumed) for _ in range(12)] == expected
    assert all(b == sorted(b) for b in expected)  # each batch's rows are read in order (shard locality)
    for s in (straight, resumed):
        s.close()


def test_shard_files_are_verified_before_a_streamed_run_reads_them(tmp_path: Path) -> None:
    _numbered_set(tmp_path, 40)
    shard = tmp_path / "train_002.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_002\.npy: content hash .* does not match"):
        load_split(tmp_path, "train", mmap=True)


def test_placement_follows_the_size_and_the_param() -> None:
    cpu = torch.device("cpu")
    assert choose_placement("auto", 1 << 20, cpu)[0] == "device"
    mode, why = choose_placement("auto", 1 << 60, cpu)
    assert mode == "stream" and "exceed half of the host's available" in why
    assert choose_placement("stream", 1 << 20, cpu) == ("stream", "train.data_placement=stream")
    assert choose_placement("host", 1 << 60, cpu)[0] == "host"


def _trainer(tiny_tensors: Path, workdir: Path, images: Any = None, **train: Any) -> Trainer:
    data = load_split(tiny_tensors / "augmented", "train", mmap=True)
    cfg = resolve({**SMALL, **train}, seed=0, image_shape=data.shape, num_classes=data.num_classes)
    return Trainer(cfg, data.images if images is None else images, torch.from_numpy(data.labels), device="cpu",
                   workdir=workdir, progress=False)


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    st = tr.state()
    return {f"{n}.{k}": v for n, sd in st["models"].items() for k, v in sd.items()} | {
        f"ema.{k}": v for k, v in st["ema"].items()}


@pytest.mark.parametrize("model", ["dcgan", "wgan_gp"])
def test_streamed_training_resumes_bitwise_across_epochs(tiny_tensors: Path, tmp_path: Path, model: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """120 images at batch 32: 3 batches an epoch, so the resumed half starts mid-epoch and crosses
    epoch ends (wgan_gp draws 2 batches a step)."""
    torch.use_deterministic_algorithms(True)
    extra = {"n_critic": 2} if model == "wgan_gp" else {"diffaug": ["translation"], "conditional": True}
    with caplog.at_level(logging.INFO, logger="pipeline.training.sampler"):
        straight = _trainer(tiny_tensors, tmp_path / "a", steps=8, model=model, data_placement="stream", **extra)
    assert "streamed from the shard files: train.data_placement=stream" in caplog.text
    straight.run()
    _trainer(tiny_tensors, tmp_path / "b", steps=4, model=model, data_placement="stream", **extra).run()
    resumed = _trainer(tiny_tensors, tmp_path / "b", steps=8, model=model, data_placement="stream", **extra)
    assert resumed.try_resume() and resumed.step == 4
    resumed.run()
    assert straight.state()["sampler"]["epoch"] >= 2
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A resident run of the same config draws in another order: its checkpoint is not resumed.
    assert not _trainer(tiny_tensors, tmp_path / "b", steps=8, model=model, data_placement="device",
                        **extra).try_resume()


def test_resident_training_from_shard_files_equals_training_from_a_tensor(tiny_tensors: Path, tmp_path: Path) -> None:
    """The train stage now hands the Trainer the shard files; a resident run computes what it did
    from the in-memory tensor, bit for bit."""
    from_tensor = _trainer(tiny_tensors, tmp_path / "t", steps=3,
                           images=torch.from_numpy(load_split(tiny_tensors / "augmented", "train").images))
    from_files = _trainer(tiny_tensors, tmp_path / "f", steps=3)
    assert not from_files.sampler.streamed and from_files.sampler.placement == "device"
    for tr in (from_tensor, from_files):
        tr.run()
    a, b = _weights(from_tensor), _weights(from_files)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Through the real stages, in processes whose address space is limited well below the set's size
# --------------------------------------------------------------------------------------------

# Reports the process's peak address space (VmPeak) when it exits, then runs `python -m pipeline`.
_VMPEAK_MAIN = """
import atexit, os, runpy, sys
def report():
    status = open("/proc/self/status").read()
    peak = next(int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmPeak:"))
    with open(os.environ["VMPEAK_FILE"], "w") as fh:
        fh.write(str(peak))
atexit.register(report)
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""
SHAPE = (3, 64, 64)
BIG = 20_000  # 20,000 x 3 x 64 x 64 = 234 MiB of training images
MARGIN = 64 << 20  # address space allowed beyond what the same command needs on a tiny set


def _tensor_project(root: Path, n: int) -> Path:
    """A project laid out like the stage tests', with ``n`` random 64x64 RGB training images (written
    1,000 at a time) and 64 test images, in 16 MiB shards."""
    from helpers_project import tiny_params, write_params
    from pipeline.io import ShardWriter

    (root / "dvc.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    out = root / "data" / "tensors"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", n), ("test", 64)):
        writer = ShardWriter(out, split, shard_bytes=16 << 20)
        for start in range(0, count, 1000):
            k = min(1000, count - start)
            writer.add(rng.integers(0, 256, (k, *SHAPE), dtype=np.uint8), rng.integers(0, 10, k))
        splits[split] = writer.close()
    write_json(out / "meta.json", {"splits": splits, "num_classes": 10, "image_shape": list(SHAPE)})
    params = tiny_params(
        base={"device": "cpu"}, augment={"copies": 0},
        train={**SMALL, "batch_size": 8, "steps": 6, "checkpoint_every": 3, "data_placement": "auto"},
        evaluate={"n_samples": 20, "batch_size": 100, "kid_subsets": 2, "bootstrap": 2, "seeds": 1})
    write_params(root / "params.yaml", params)
    return root


def _stage(root: Path, *args: str, limit: int | None = None, steps: int | None = None,
           placement: str | None = None) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``python -m pipeline ARGS`` in ``root`` (under RLIMIT_AS = ``limit``): (result, its VmPeak)."""
    import resource

    from helpers_project import venv_env

    params = yaml.safe_load((root / "params.yaml").read_text())
    if steps is not None:
        params["train"]["steps"] = steps
    params["train"]["data_placement"] = placement or "auto"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    peak_file = root / "vmpeak"
    peak_file.unlink(missing_ok=True)

    def set_limit() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # RLIMIT_AS counts reserved address space, not memory used, and glibc's malloc reserves it at
    # random unless told otherwise: a new arena (64 MiB) for each thread that meets contention, and
    # a threshold between heap and mmap'd blocks that moves with the order of frees (the heap then
    # keeps holes). Both made the same command's peak vary by 60 MiB from run to run, about MARGIN.
    # One arena and a fixed threshold make it repeat to 0.1 MiB.
    env = venv_env(PIPELINE_TRACKING="0", VMPEAK_FILE=str(peak_file), MALLOC_ARENA_MAX="1",
                   MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TOP_PAD_="0")
    out = subprocess.run([sys.executable, "-c", _VMPEAK_MAIN, *args], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600, preexec_fn=set_limit)
    return out, int(peak_file.read_text()) if peak_file.exists() else -1


def _ok(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny project and a big one (234 MiB of training images), an evaluator, what each command
    needs on the tiny set (torch alone maps gigabytes of address space), and the big set's
    data/augmented written by the augment stage under a limit of that need + MARGIN."""
    from pipeline.params import load_params
    from pipeline.stages import evaluator

    root = tmp_path_factory.mktemp("limited")
    small, big = _tensor_project(root / "small", 256), _tensor_project(root / "big", BIG)
    assert BIG * int(np.prod(SHAPE)) > 3 * MARGIN
    # The evaluator is trained on the small set (its features only need the shape right).
    evaluator.run(load_params(small / "params.yaml"), small / "data/tensors", small / "models/evaluator.pt",
                  small / "evaluator.json", progress=False)
    (big / "models").mkdir()
    shutil.copy(small / "models/evaluator.pt", big / "models/evaluator.pt")
    need = {}
    out, need["augment"] = _stage(small, "augment")
    _ok(out)
    out, need["train"] = _stage(small, "train", "--evaluator", "none.pt", placement="stream")
    _ok(out)
    assert min(need.values()) > 0
    # Augment copies the originals chunk by chunk: the set never passes through memory whole.
    _ok(_stage(big, "augment", limit=need["augment"] + MARGIN)[0])
    return {"small": small, "big": big, "need": need}


def _weights_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, sd in ckpt["models"].items() for k, v in sd.items()} | {
        f"ema.{k}": v for k, v in ckpt["ema"].items()}


def test_a_set_several_times_the_memory_limit_trains_and_resumes_bitwise(limited: dict[str, Any]) -> None:
    from pipeline.training.checkpoint import load_checkpoint

    big, limit = limited["big"], limited["need"]["train"] + MARGIN
    out = _ok(_stage(big, "train", "--evaluator", "none.pt", limit=limit, steps=6)[0])
    # train.data_placement: auto chose to stream, and said why.
    assert "streamed from the shard files" in out.stderr and "exceed half of the host's available" in out.stderr
    straight = load_checkpoint(big / "models/checkpoint.pt")
    shutil.rmtree(big / ".pipeline")
    _ok(_stage(big, "train", "--evaluator", "none.pt", limit=limit, steps=3)[0])
    out = _ok(_stage(big, "train", "--evaluator", "none.pt", limit=limit, steps=6)[0])
    assert "resumed from" in out.stderr and "at step 3" in out.stderr
    resumed = load_checkpoint(big / "models/checkpoint.pt")
    a, b = _weights_of(straight), _weights_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert (straight["sampler"]["epoch"], straight["sampler"]["pos"]) == (resumed["sampler"]["epoch"],
                                                                          resumed["sampler"]["pos"]) == (0, 6)


def test_a_set_several_times_the_memory_limit_evaluates_and_cannot_be_held_in_memory(
        limited: dict[str, Any]) -> None:
    small, big = limited["small"], limited["big"]
    if not (big / "models/best.pt").exists():  # this test alone: train first (unlimited; tested above)
        _ok(_stage(big, "train", "--evaluator", "none.pt", steps=3)[0])
    out, need = _stage(small, "evaluate")
    _ok(out)
    _ok(_stage(big, "evaluate", limit=need + MARGIN)[0])
    metrics = json.loads((big / "reports/metrics.json").read_text())
    assert math.isfinite(float(metrics["fid_train_vs_test"]))
    # The limit bites: holding the set in host memory (train.data_placement: host) fails, and says what to do.
    out, _ = _stage(big, "train", "--evaluator", "none.pt", limit=limited["need"]["train"] + MARGIN, steps=6,
                    placement="host")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "do not fit in host memory" in out.stderr and "train.data_placement: stream" in out.stderr


def test_ddp_ranks_stream_their_own_parts_and_resume(tiny_tensors: Path, tmp_path: Path) -> None:
    """Two gloo processes through the train stage: each streams 60 of the 120 images an epoch
    (3 batches of 16), the replicas stay identical, and the run resumes from per-rank checkpoints."""
    from helpers_project import tiny_params, venv_env, write_params
    from pipeline.training.checkpoint import load_checkpoint

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(tiny_tensors / "augmented", tmp_path / "data" / "augmented")
    shutil.copytree(tiny_tensors / "tensors", tmp_path / "data" / "tensors")
    params = tiny_params(base={"device": "cpu"}, train={**SMALL, "batch_size": 16, "steps": 4, "devices": 2,
                                                        "checkpoint_every": 2, "data_placement": "stream"})
    cmd = [sys.executable, "-m", "pipeline", "train", "--evaluator", "none.pt"]
    env = venv_env(PIPELINE_TRACKING="0")
    write_params(tmp_path / "params.yaml", params)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stderr.count("60 images (1, 28, 28) uint8 (0 MiB) streamed from the shard files") == 2
    work = next((tmp_path / ".pipeline" / "train").iterdir())
    r0, r1 = (load_checkpoint(work / f"checkpoint-rank{r}.pt") for r in range(2))
    assert (r0["sampler"]["epoch"], r0["sampler"]["pos"]) == (r1["sampler"]["epoch"], r1["sampler"]["pos"]) == (1, 1)
    for net in ("g", "d"):
        for k, v in r0["models"][net].items():
            if "running_" not in k and "num_batches" not in k:  # BN statistics are per rank (sync_bn off)
                assert torch.equal(v, r1["models"][net][k]), k
    params["train"]["steps"] = 6
    write_params(tmp_path / "params.yaml", params)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stderr
    r0 = load_checkpoint(work / "checkpoint-rank0.pt")
    assert r0["step"] == 6 and (r0["sampler"]["epoch"], r0["sampler"]["pos"]) == (1, 3)  # 2 epochs done
