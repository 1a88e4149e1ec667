"""Training batches: images with their dataset indices, a sampler that resumes mid-epoch, per-image flips."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from itdiffusion import distributed
from itdiffusion.seeding import Stream, stream_seed_tensor
from itdiffusion.training.errors import FinetuneError

log = logging.getLogger(__name__)


def random_hflip(x: Tensor, seed: int, epoch: int, indices: Tensor) -> Tensor:
    """Flip each image left-right with probability 1/2, decided by its own seed."""
    flip = (stream_seed_tensor(seed, indices, Stream.TRAIN_FLIP, epoch) & 1).bool().to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class IndexedImages(Dataset):
    """``(uint8 image [C,H,W], index)`` pairs from a dataset of images (or of ``(image, ...)`` tuples)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = self.images[index]
        image = item[0] if isinstance(item, tuple | list) else item
        image = torch.as_tensor(image)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise FinetuneError(
                f"training image {index} is {image.dtype} of shape {tuple(image.shape)}; "
                "expected uint8 [channels, height, width]"
            )
        return image, index


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch) that can start partway into an epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        super().__init__(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                         shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Iterate epoch ``epoch`` of this process's order, leaving out its first ``skip`` indices."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def ignore_sigterm(_worker_id: int) -> None:
    # Data workers leave SIGTERM to the main process, which saves and then shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
