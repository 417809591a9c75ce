"""One site's share of scikit-learn's 8×8 digits as a LightningDataModule (no download).

The split is hello-pt's (``examples/hello-pt/data.py``), repeated here because a job bundle
carries only its own folder: every site holds 512 training images, 90% of them from its own
three or four "home" digits, and all sites are scored on the same 261-image test split.
"""

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

SAMPLES_PER_SITE = 512
TEST_SIZE = 261


def site_index(site_name: str) -> int:
    """``site-3`` → 2. Other names are hashed onto a site slot."""
    tail = site_name.rsplit("-", 1)[-1]
    return int(tail) - 1 if tail.isdigit() else sum(site_name.encode())


def load_data(
    site_name: str, num_sites: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` for one site, as in hello-pt."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, pool = order[:TEST_SIZE], order[TEST_SIZE:]
    index = site_index(site_name) % num_sites
    rng = np.random.default_rng(1000 + index)
    home = [d for d in range(10) if d % num_sites == index]
    home_pool = pool[np.isin(y[pool], home)]
    n_home = int(SAMPLES_PER_SITE * 0.9)
    picked = np.concatenate(
        [
            rng.choice(home_pool, n_home, replace=len(home_pool) < n_home),
            rng.choice(pool, SAMPLES_PER_SITE - n_home, replace=False),
        ]
    )
    t = torch.from_numpy
    return t(x[picked]), t(y[picked]), t(x[test]), t(y[test])


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, site_name: str, num_sites: int = 3, batch_size: int = 32) -> None:
        super().__init__()
        self.site_name = site_name
        self.num_sites = num_sites
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            x_train, y_train, x_test, y_test = load_data(self.site_name, self.num_sites)
            self.train_set = TensorDataset(x_train, y_train)
            self.test_set = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=len(self.test_set))
