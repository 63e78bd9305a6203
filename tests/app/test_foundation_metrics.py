"""Metrics: top-k vs a loop, weighted kNN on a hand-made case, linear probe, feature extraction."""

from __future__ import annotations

import math

import pytest
import torch
from bissl.metrics import extract_features, knn_accuracy, linear_probe_accuracy, topk_accuracy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def test_topk_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g)
    targets = torch.randint(0, 7, (50,), generator=g)
    got = topk_accuracy(logits, targets, ks=(1, 3, 5, 10))
    for k in (1, 3, 5):
        hits = 0
        for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
            order = sorted(range(7), key=lambda c: -row[c])
            hits += t in order[:k]
        assert got[k] == pytest.approx(hits / 50)
    assert got[10] == 1.0  # k capped at the 7 classes
    with pytest.raises(ValueError, match="targets"):
        topk_accuracy(logits, targets[:3])


def test_knn_weighted_vote_by_hand() -> None:
    # training points on the unit circle; a test point at angle 0 with k=3:
    # neighbours at 0.1 (class 0), -0.2 (class 1), 0.3 (class 1). Weighted votes exp(cos/T):
    # class 0: e^{cos 0.1/T}, class 1: e^{cos 0.2/T} + e^{cos 0.3/T}.
    angles = torch.tensor([0.1, -0.2, 0.3, 2.0, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], dim=1) * 5  # scale must not matter
    labels = torch.tensor([0, 1, 1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    # T = 1: class 0 gets e^{0.995} = 2.70, class 1 e^{0.980} + e^{0.955} = 5.26 -> class 1.
    # T = 0.001: class 0 gets e^{995.0}, class 1 e^{980.1} + e^{955.3} -> class 0 (an unweighted
    # majority vote would say class 1).
    assert math.exp(math.cos(0.1)) < math.exp(math.cos(0.2)) + math.exp(math.cos(0.3))
    # with T = 1 class 1 wins (two neighbours), with T = 0.001 the nearest neighbour dominates
    assert knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=1.0) == 1.0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), k=3, temperature=0.001) == 1.0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), k=1) == 1.0


def test_linear_probe_separable_vs_noise() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 4
    y_train, y_test = (
        torch.randint(0, 4, (200,), generator=g),
        torch.randint(0, 4, (100,), generator=g),
    )
    x_train = centers[y_train] + torch.randn(200, 16, generator=g)
    x_test = centers[y_test] + torch.randn(100, 16, generator=g)
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test) > 0.95
    noise = torch.randn(200, 16, generator=g), torch.randn(100, 16, generator=g)
    assert linear_probe_accuracy(noise[0], y_train, noise[1], y_test) < 0.5
    a = linear_probe_accuracy(x_train, y_train, x_test, y_test, epochs=5, seed=1)
    assert a == linear_probe_accuracy(x_train, y_train, x_test, y_test, epochs=5, seed=1)


def test_extract_features_eval_mode_no_grad_restores_mode() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net.train()
    x = torch.randn(10, 3)
    y = torch.arange(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    before = net[1].running_mean.clone()
    feats, labels = extract_features(net, loader, "cpu")
    assert net.training and torch.equal(net[1].running_mean, before)  # eval mode: stats untouched
    assert feats.shape == (10, 4) and not feats.requires_grad and torch.equal(labels, y)
    net.eval()
    torch.testing.assert_close(feats, net(x).detach())
