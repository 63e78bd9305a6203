"""Evaluation metrics: top-k accuracy, feature extraction, weighted kNN and a linear probe.

All accuracies are fractions in [0, 1].

Public names: :func:`topk_accuracy`, :func:`extract_features`, :func:`knn_accuracy`,
:func:`linear_probe_accuracy`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_features", "knn_accuracy", "linear_probe_accuracy", "topk_accuracy"]


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of rows whose target is among the k highest logits, for each k.

    Args:
        logits: (N, C) scores.
        targets: (N,) class indices.
        ks: the k values; each is capped at C (so k=5 with 3 classes gives 1.0).

    Returns:
        ``{k: accuracy}`` keyed by the requested k.
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample, got N = 0")
    if any(k < 1 for k in ks):
        raise ValueError(f"ks={tuple(ks)} must all be >= 1")
    num_classes = logits.shape[1]
    top = logits.topk(min(max(ks), num_classes), dim=1).indices  # (N, kmax)
    hits = top == targets.reshape(-1, 1)  # (N, kmax)
    return {k: hits[:, : min(k, num_classes)].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Backbone features of every batch of ``loader`` in eval mode, without gradients.

    The module's previous train/eval mode is restored afterwards.

    Args:
        backbone: maps images (B, C, H, W) to features (B, D).
        loader: iterable of ``(images, labels)`` batches.
        device: where the backbone runs.

    Returns:
        ``(features (N, D) float32, labels (N,) int64)``, both on the CPU.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            feats.append(backbone(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y).to(torch.int64).cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features got an empty loader")
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Weighted cosine k-nearest-neighbour accuracy (Wu et al., 2018; as in SSL evaluations).

    Each test point takes its k most cosine-similar training points; neighbour j votes for its
    class with weight ``exp(s_j / temperature)``; the class with the largest total wins.

    Args:
        train_feats: (M, D) features; train_labels: (M,) class indices.
        test_feats: (N, D) features; test_labels: (N,) class indices.
        k: neighbours (capped at M).
        temperature: > 0.

    Returns:
        Accuracy on the test points.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k!r} must be >= 1 and temperature={temperature!r} > 0")
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("knn_accuracy needs non-empty train and test features")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_feats.float(), dim=1)  # (M, D)
    test = F.normalize(test_feats.float(), dim=1)  # (N, D)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), 1024):  # chunks bound the (chunk, M) similarity matrix
        sims = test[start : start + 1024] @ train.T  # (B, M)
        top_sims, top_idx = sims.topk(k, dim=1)  # (B, k)
        votes = torch.zeros(len(sims), num_classes, device=sims.device)  # (B, C)
        votes.scatter_add_(1, train_labels.to(sims.device)[top_idx], (top_sims / temperature).exp())
        pred = votes.argmax(dim=1)  # (B,)
        correct += int((pred == test_labels[start : start + 1024].to(pred.device)).sum())
    return correct / len(test)


def linear_probe_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Accuracy of a multinomial logistic regression trained on frozen features.

    Features are standardised with the training mean/std, then a linear layer is trained with
    full-batch Adam for ``epochs`` steps on the cross-entropy loss.

    Args:
        train_feats: (M, D); train_labels: (M,).
        test_feats: (N, D); test_labels: (N,).
        epochs: full-batch optimisation steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty (Adam's ``weight_decay``).
        seed: seed of the layer's initialisation.

    Returns:
        Test accuracy.
    """
    if epochs < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"need epochs >= 1, lr > 0, weight_decay >= 0; got {epochs!r}, {lr!r}, {weight_decay!r}"
        )
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("linear_probe_accuracy needs non-empty train and test features")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x_train = train_feats.detach().float()
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mean) / std  # (M, D)
    x_test = (test_feats.detach().float().to(x_train.device) - mean) / std  # (N, D)
    y_train = train_labels.to(x_train.device, torch.int64)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, x_train.shape[1], generator=generator)).to(
        x_train.device
    )
    weight.requires_grad_(True)
    bias = torch.zeros(num_classes, device=x_train.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            F.cross_entropy(F.linear(x_train, weight, bias), y_train).backward()
            optimizer.step()
    with torch.no_grad():
        pred = F.linear(x_test, weight, bias).argmax(dim=1)
    return (pred.cpu() == test_labels.cpu()).float().mean().item()
