"""Scikit-learn's 8×8 digits (they ship with it: no download), split across sites with
strongly skewed labels.

Every digit has one home site (digit ``d`` lives at site ``d % num_sites``), which holds 90% of
that digit's images; the other 10% are spread over the other sites. With five sites each site
holds mostly two digits (site-1: 0 and 5, site-2: 1 and 6, …), the kind of label skew under
which local training drifts and the workflows in this folder differ.

Each site keeps a fifth of its images as its own validation data, skewed like its training
data: that is what a site's ``accuracy`` measures. ``load_test_data()`` is a balanced split
that no site holds, for scoring global models in the demos only: a real server holds no data.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.datasets import load_digits

HOME_SHARE = 0.9
"""The share of a digit's images that its home site holds."""
VALIDATION_SHARE = 0.2
"""The share of a site's images it keeps for validation."""
TEST_SIZE = 360
"""Images held out from every site, balanced over the digits by chance (a fifth of 1,797)."""

Tensors = tuple[torch.Tensor, torch.Tensor]


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, digits.target.astype(np.int64)


def site_index(site_name: str, num_sites: int) -> int:
    """``site-3`` → 2. Other names are hashed onto a site slot, so any site gets a share."""
    tail = site_name.rsplit("-", 1)[-1]
    index = int(tail) - 1 if tail.isdigit() else sum(site_name.encode())
    return index % num_sites


def home_digits(site_name: str, num_sites: int) -> list[int]:
    """The digits whose home is this site."""
    index = site_index(site_name, num_sites)
    return [digit for digit in range(10) if digit % num_sites == index]


@functools.cache
def _owners(num_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, owner)``: the images sites hold, and which site holds each."""
    if not isinstance(num_sites, int) or not 1 <= num_sites <= 10:
        # More than ten sites would leave some without a home digit.
        raise ValueError(f"num_sites: must be an integer from 1 to 10, got {num_sites!r}")
    _, y = _digits()
    rng = np.random.default_rng(0)
    pool = rng.permutation(len(y))[TEST_SIZE:]
    home = y[pool] % num_sites
    away = rng.random(len(pool)) >= HOME_SHARE
    # An image that leaves home goes to one of the other sites, each as likely.
    shift = 1 + rng.integers(0, max(num_sites - 1, 1), len(pool))
    owner = np.where(away & (num_sites > 1), (home + shift) % num_sites, home)
    return pool, owner


def load_site_data(site_name: str, num_sites: int = 5) -> tuple[Tensors, Tensors]:
    """``((x_train, y_train), (x_val, y_val))`` for one site: its own images, no other's."""
    x, y = _digits()
    pool, owner = _owners(num_sites)
    index = site_index(site_name, num_sites)
    mine = np.random.default_rng(1000 + index).permutation(pool[owner == index])
    n_val = int(len(mine) * VALIDATION_SHARE)
    val, train = mine[:n_val], mine[n_val:]
    t = torch.from_numpy
    return (t(x[train]), t(y[train])), (t(x[val]), t(y[val]))


def load_test_data() -> Tensors:
    """The held-out balanced test split (``TEST_SIZE`` images), for the demos' final score."""
    x, y = _digits()
    test = np.random.default_rng(0).permutation(len(y))[:TEST_SIZE]
    return torch.from_numpy(x[test]), torch.from_numpy(y[test])
