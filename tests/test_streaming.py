"""Training sets larger than memory: shard files read on demand, each DDP rank its own part, resume exact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

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


def test_placement_follows_the_size_and_the_param(caplog: pytest.LogCaptureFixture) -> None:
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
