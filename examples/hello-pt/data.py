"""Real data that ships inside scikit-learn (no download): the 8×8 digits, split non-IID.

Every site holds 512 training images, 90% of them from its own three or four "home" digits
and the rest from all ten, so no site alone sees enough of every digit. A fixed test split
of 261 images stands in for each site's own validation data, the same everywhere so that
accuracies can be compared.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits

SAMPLES_PER_SITE = 512
TEST_SIZE = 261


def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, digits.target.astype(np.int64)


def site_index(site_name: str) -> int:
    """``site-3`` → 2. Other names are hashed onto a site slot."""
    tail = site_name.rsplit("-", 1)[-1]
    return int(tail) - 1 if tail.isdigit() else sum(site_name.encode())


def load_data(
    site_name: str, num_sites: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` for one site."""
    x, y = _digits()
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
