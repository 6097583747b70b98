"""Small data sets that ship with the course's dependencies, so nothing is downloaded."""

from __future__ import annotations

import numpy as np


def load_digits_split(test_fraction: float = 0.25, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), split and scaled to [0, 1].

    Returns ``X_train, X_test, y_train, y_test`` with X as float32 of shape (N, 64) and y as
    int64 labels 0-9. The split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=seed, stratify=y)
    return X_train, X_test, y_train, y_test
