"""The BiSSL stage at paper scale (issue 18): SyncBN, lower warm-up, Hessian batch, STL10 split,
downstream interpolation, theta_D's start, bad-solve decisions and gradient clipping.

Each test checks against something written out here: hand-computed schedules, batch indices and
CG steps, torch's documented clipping formula, ``F.interpolate``, checkpoint contents.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from bissl.augment import TwoViewDataset
from bissl.checkpoint import save_checkpoint
from bissl.config import ConfigError, load_config
from bissl.data import get_spec, load_split, split_indices
from bissl.distributed import DistInfo, prepare_model
from bissl.models import Classifier
from bissl.rundir import RunDir
from bissl.stages._common import downstream_datasets, load_splits, new_classifier
from bissl.stages.bilevel import (
    SOLVE_OUTCOMES,
    BatchStream,
    Streams,
    build_system,
    hessian_batch,
    load_initial_state,
    lower_optimizer,
    lower_step,
    solve_decision,
    stage_losses,
    stream_seed,
    upper_step,
)
from bissl.stages.pretext import SimCLRNet, build_simclr, prepare_simclr
from bissl_helpers import (
    INFO,
    batches,
    expected_upper_gradients,
    flat,
    make_state,
    pretext_loss_reference,
    rel,
    tiny_backbone,
)
from torch import Tensor, nn

import hypergrad

# --- 1. SyncBN: never in the BiSSL stage --------------------------------------------------------


def _has_sync_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


def _write_checkpoints(run: RunDir, cfg: object, *, warmup_shift: float = 0.0) -> tuple[SimCLRNet, Classifier]:
    """pretext-final (a SimCLR net) and warmup-final (its backbone with shifted BN statistics + a head)."""
    torch.manual_seed(0)
    net = build_simclr(cfg, 1)  # type: ignore[arg-type]
    save_checkpoint(run.checkpoint("pretext-final"),
                    {"model": net.state_dict(), "backbone": net.backbone.state_dict()}, with_rng=False)
    warm = new_classifier(cfg, get_spec("digits"))  # type: ignore[arg-type]
    warm.backbone.load_state_dict(net.backbone.state_dict())
    with torch.no_grad():
        for name, buf in warm.backbone.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(warmup_shift)
        for p in warm.head.parameters():
            p.normal_()
    save_checkpoint(run.checkpoint("warmup-final"), {"last": warm.state_dict()}, with_rng=False)
    return net, warm


@pytest.mark.parametrize("sync_bn", [True, False])
def test_bissl_stage_holds_no_syncbn_on_distributed_cuda(sync_bn: bool, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Device faked as CUDA with two ranks: pretext training and fine-tuning follow model.sync_bn,
    theta_P's network in the BiSSL stage never holds SyncBatchNorm (it has no double backward)."""
    fake_cuda = DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))
    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: self)  # no GPU here
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, device_ids=None: module)
    cfg = load_config("digits", [f"model.sync_bn={str(sync_bn).lower()}", "model.width=4"])
    assert _has_sync_bn(prepare_simclr(build_simclr(cfg, 1), cfg, fake_cuda)) == sync_bn  # pretext
    _, bare = prepare_model(new_classifier(cfg, get_spec("digits")), fake_cuda, sync_bn=cfg.model.sync_bn)
    assert _has_sync_bn(bare) == sync_bn  # fine-tuning
    run = RunDir.create(tmp_path / "run", cfg)
    _write_checkpoints(run, cfg)
    state = load_initial_state(cfg, run, get_spec("digits"), fake_cuda)
    assert not _has_sync_bn(state.lower) and not _has_sync_bn(state.upper)
    # the lower optimiser updates the very parameters of the stage's network
    opt_params = {id(p) for g in state.lower_opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in state.lower.parameters()}


# --- 2. lower warm-up ---------------------------------------------------------------------------


def _lower_lrs(overrides: list[str], steps: list[int], preset: str = "digits") -> dict[int, float]:
    cfg = load_config(preset, overrides)
    opt, sched = lower_optimizer(cfg, SimCLRNet(tiny_backbone(), nn.Linear(32, 4)))
    lrs, last = {}, max(steps)
    for t in range(last + 1):
        if t in steps:
            lrs[t] = opt.param_groups[0]["lr"]  # the rate step t runs at
        sched.step()
    return lrs


def test_stl10_paper_lower_schedule_equals_hand_computation() -> None:
    """The released scheduler sets the rate after each step from its step counter t (from 1):
    t / 980 while t < 980, then 0.001 + 0.999 (1 + cos(pi (t - 980) / 9020)) / 2; step 0 runs at
    the optimiser's initial rate, the full lr (the quirk)."""
    cfg = load_config("stl10-paper")
    assert (cfg.bissl.lower_warmup_steps, cfg.bissl.total_lower_steps, cfg.bissl.lower_lr) == (980, 10_000, 1.0)
    lrs = _lower_lrs([], [0, 1, 489, 979, 980, 5490, 9999], "stl10-paper")
    expected = {0: 1.0, 1: 1 / 980, 489: 489 / 980, 979: 979 / 980, 980: 1.0, 5490: 0.001 + 0.999 * 0.5,
                9999: 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 9019 / 9020))}
    for t, lr in expected.items():
        assert lrs[t] == pytest.approx(lr, rel=1e-12, abs=1e-15), t


def test_lower_warmup_without_the_quirk_warms_up_the_first_step() -> None:
    base = ["bissl.alternations=10", "bissl.lower_steps=10", "bissl.lower_warmup_steps=4", "bissl.lower_lr=2.0",
            "bissl.lower_final_lr_ratio=0.1"]
    plain = _lower_lrs(base, [0, 1, 3, 4, 52, 99])
    # (t + 1) / 4 * 2.0 while warming up; then 2.0 * (0.1 + 0.9 * (1 + cos(pi (t - 4) / 96)) / 2)
    assert plain == pytest.approx({0: 0.5, 1: 1.0, 3: 2.0, 4: 2.0, 52: 2.0 * 0.55,
                                   99: 2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * 95 / 96)))}, rel=1e-12)
    quirk = _lower_lrs([*base, "bissl.lower_warmup_first_step_full_lr=true"], [0, 1, 3, 4, 52])
    assert quirk == pytest.approx({0: 2.0, 1: 0.5, 3: 1.5, 4: 2.0, 52: 2.0 * 0.55}, rel=1e-12)
    with pytest.raises(ConfigError, match=r"bissl\.lower_warmup_first_step_full_lr"):
        load_config("digits", ["bissl.lower_warmup_first_step_full_lr=true"])


# --- 3. Hessian batch ---------------------------------------------------------------------------


class _Numbered(torch.utils.data.Dataset):
    """Item i: a 1x1x1 uint8 image of value i (labels unused)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor([[[i]]], dtype=torch.uint8), 0


def _noisy(image: Tensor) -> Tensor:
    """The image index plus a random fraction in [0, 0.5): floor() recovers the index."""
    return image.float() + 0.5 * torch.rand(())


def _indices(batch: tuple[Tensor, Tensor]) -> list[int]:
    return sorted(int(v) for v in batch[0].floor().reshape(-1))


def test_reference_hessian_batch_is_the_current_pass_first_lower_batch() -> None:
    """10 items, lower batches of 3 (3 a pass), 2 lower steps an alternation: after alternation a
    the last lower batch is 2a + 1, in pass (2a + 1) // 3, whose first batch is 3 * that."""
    cfg = load_config("digits", ["bissl.lower_batch_size=3", "bissl.lower_steps=2", "bissl.alternations=5",
                                 "bissl.hessian_batch_size=null", "bissl.hessian_batch_source=reference"])
    pairs = TwoViewDataset(_Numbered(), _noisy, _noisy)
    lower = BatchStream(pairs, 3, 5, INFO, first_epoch=4)
    streams = Streams(lower=lower, hessian=BatchStream(pairs, 3, stream_seed(5, 1), INFO), upper=lower)
    lower_batches = list(lower.batches(0, 10, cfg))  # what the lower steps of alternations 0..4 receive
    first_of_pass = {0: 0, 1: 3, 2: 3, 3: 6, 4: 9}
    seen = []
    for a, k in first_of_pass.items():
        h = hessian_batch(streams, a, cfg)
        assert _indices(h) == _indices(lower_batches[k]), a  # the same images ...
        assert not torch.equal(torch.sort(h[0].reshape(-1)).values, torch.sort(lower_batches[k][0].reshape(-1)).values)
        seen.append(h[0])  # ... re-augmented
    assert not torch.equal(seen[1], seen[2])  # alternations 1 and 2: same images, new augmentations

    independent = load_config("digits", ["bissl.lower_batch_size=3", "bissl.lower_steps=2", "bissl.alternations=5",
                                         "bissl.hessian_batch_size=3"])
    for a in range(5):  # today's default: the Hessian stream's own batch a
        assert torch.equal(hessian_batch(streams, a, independent)[0], next(streams.hessian.batches(a, 1, cfg))[0])
    with pytest.raises(ConfigError, match=r"bissl\.hessian_batch_size"):
        load_config("digits", ["bissl.hessian_batch_source=reference", "bissl.hessian_batch_size=32"])  # != 128


# --- 4. split, interpolation, theta_D's start ----------------------------------------------------


def test_val_size_split_has_the_released_sizes_and_a_fixed_seed() -> None:
    train, val = split_indices(5000, 0.1, 0, val_size=1000)  # stl10: 5,000 labelled training images
    assert (len(train), len(val)) == (4000, 1000)
    assert sorted(train + val) == list(range(5000))
    assert load_config("stl10-paper").data.val_size == 1000
    n_pool = len(load_split("digits", "train", root=None, val_fraction=0.1, seed=0)) + \
        len(load_split("digits", "val", root=None, val_fraction=0.1, seed=0))
    vals = {}
    for seed in (0, 3):
        for val_seed in ("7", "null"):
            cfg = load_config("digits", [f"seed={seed}", "data.val_size=300", f"data.val_seed={val_seed}"])
            splits = load_splits(cfg, INFO)
            assert (len(splits.val), len(splits.train)) == (300, n_pool - 300)
            vals[seed, val_seed] = splits.val.indices  # type: ignore[attr-defined]
    assert vals[0, "7"] == vals[3, "7"]  # a fixed split for every run seed
    assert vals[0, "null"] != vals[3, "null"]  # today's default: a split per run seed


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_downstream_interpolation(mode: str) -> None:
    """digits 8 px. Test: Resize(18) -> CenterCrop(16); train with a crop of the whole image
    (scale 1; no aspect ratio fits exactly, so torchvision falls back to the full image): a
    resize to 16. Written with F.interpolate: antialiased kernels in two separable passes (width,
    then height), each rounded and clamped to uint8, as torchvision's uint8 path does; then
    normalised with the digits statistics."""
    cfg = load_config("digits", [f"augment.downstream_interpolation={mode}", "augment.downstream_crop_scale=[1.0,1.0]",
                                 "augment.aspect_ratio_quirk=false"])
    splits = load_splits(cfg, INFO)
    train, _, val, _ = downstream_datasets(cfg, splits)

    def by_hand(image: Tensor, kind: str, size: int, crop: int) -> Tensor:
        wide = F.interpolate(image[None].double(), size=(8, size), mode=kind, align_corners=False, antialias=True)
        up = F.interpolate(wide.round().clamp(0, 255), size=(size, size), mode=kind, align_corners=False, antialias=True)
        up = up.round().clamp(0, 255)[0, :, crop:size - crop, crop:size - crop]
        return ((up / 255 - 0.3053) / 0.3759).float()

    other = "bicubic" if mode == "bilinear" else "bilinear"
    tol = 1.01 / 255 / 0.3759  # one grey level
    for got, image, size, crop in ((val[0][0], splits.val[0][0], 18, 1), (train[0][0], splits.train[0][0], 16, 0)):
        assert float((got - by_hand(image, mode, size, crop)).abs().max()) <= tol
        assert float((got - by_hand(image, other, size, crop)).abs().max()) > 3 * tol  # tells the two apart


@pytest.mark.parametrize("upper_init", ["pretext", "warmup"])
def test_theta_d_starts_from_the_configured_model(upper_init: str, tmp_path) -> None:
    cfg = load_config("digits", ["model.width=4", f"bissl.upper_init={upper_init}"])
    run = RunDir.create(tmp_path / "run", cfg)
    net, warm = _write_checkpoints(run, cfg, warmup_shift=1.5)
    state = load_initial_state(cfg, run, get_spec("digits"), INFO)
    source = warm.backbone if upper_init == "warmup" else net.backbone
    for (k, got), (_, want) in zip(state.upper.backbone.state_dict().items(), source.state_dict().items(), strict=True):
        assert torch.equal(got, want), k
    for (k, got), (_, want) in zip(state.upper.head.state_dict().items(), warm.head.state_dict().items(), strict=True):
        assert torch.equal(got, want), k  # phi_D: the warm-up's head either way
    for (k, got), (_, want) in zip(state.lower.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(got, want), k  # theta_P, phi_P: the pretext model either way
    with pytest.raises(ConfigError, match=r"bissl\.upper_init"):
        load_config("digits", ["bissl.upper_init=warmup", "warmup.epochs=0"])


# --- 5. what a solve's result leads to ------------------------------------------------------------


def test_every_solver_result_has_an_outcome() -> None:
    assert set(SOLVE_OUTCOMES) == set(hypergrad.Result)


@pytest.mark.parametrize(("result", "solver", "policy", "expected"), [
    ("CONVERGED", "cg", "skip", "use"), ("MAX_ITERATIONS", "cg", "stop", "use"), ("UNCHECKED", "identity", "skip", "use"),
    ("BREAKDOWN", "cg", "skip", "skip"), ("BREAKDOWN", "cg", "stop", "stop"), ("BREAKDOWN", "cg", "truncate", "use"),
    ("BREAKDOWN", "layerwise_cg", "skip", "use"),  # keeps iterating past it, as the reference
    ("NONFINITE", "cg", "truncate", "skip"), ("NONFINITE", "cg", "stop", "stop"), ("NONFINITE", "layerwise_cg", "skip", "skip"),
    ("SINGULAR", "cg", "skip", "skip"), ("SINGULAR", "cg", "truncate", "use"), ("INACCURATE", "cg", "skip", "use"),
    ("DIVERGED", "neumann", "skip", "skip"), ("DIVERGED", "neumann", "truncate", "skip"),
])
def test_solve_decision_table(result: str, solver: str, policy: str, expected: str) -> None:
    from bissl.stages.bilevel import make_solver

    extra = ["bissl.solver_iterations=0"] if solver == "identity" else []
    b = load_config("digits", [f"bissl.solver={solver}", f"bissl.on_bad_solve={policy}", *extra]).bissl
    assert solve_decision(hypergrad.Result[result], make_solver(b), b) == expected


SETTINGS = ["bissl.lam=0.1", "bissl.delta=0.9", "bissl.gamma=0.3", "pretext.temperature=0.5", "bissl.upper_lr=0.05",
            "bissl.upper_weight_decay=0", "bissl.solver=cg", "bissl.solver_iterations=5", "bissl.solver_tol=0"]


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_truncate_uses_the_iterate_before_negative_curvature(policy: str) -> None:
    """A = I with the BN-bias block negated: CG's first step has positive curvature b.Ab, its
    second direction d1 negative; truncation keeps x1 = (b.b / b.Ab) b (one CG step by hand)."""
    state, cfg = make_state([*SETTINGS, "bissl.upper_grad_clip=null", f"bissl.on_bad_solve={policy}"])
    pairs, down = batches(1)
    expected, x, v = expected_upper_gradients(state, pairs, down, 0.1, 0.9, 0.3, 0.5)
    sign = torch.cat([(-1.0 if k == "1.bias" else 1.0) * torch.ones(p.numel(), dtype=v.dtype)
                      for k, p in state.lower.backbone.named_parameters()])
    bAb = float(v @ (sign * v))
    x1 = (v @ v) / bAb * v
    r1 = v - (v @ v) / bAb * sign * v
    d1 = r1 + (r1 @ r1) / (v @ v) * v
    assert bAb > 0 and float(d1 @ (sign * d1)) < 0  # a breakdown at the second iteration
    system = build_system(state, stage_losses(cfg, state.lower)[1], pairs, cfg.bissl, INFO)
    system.operator = hypergrad.FunctionOperator(
        lambda x: {k: -t if k == "1.bias" else t for k, t in x.items()}, symmetric=True)
    before = {k: p.detach().clone() for k, p in state.upper.named_parameters()}
    record = upper_step(state, system, down, cfg.bissl, INFO)
    assert record["solve_breakdown"] == 1.0
    if policy == "skip":
        assert record["skipped"] == 1.0 and state.skipped == 1
        assert all(torch.equal(before[k], p) for k, p in state.upper.named_parameters())
        return
    assert record["skipped"] == 0.0 and record["truncated"] == 1.0 and state.skipped == 0
    offset = 0
    for k, p in state.lower.backbone.named_parameters():  # backbone: x1 + gamma grad_D instead of x + ...
        n = p.numel()
        expected[f"backbone.{k}"] += (x1 - x)[offset:offset + n].reshape(p.shape)
        offset += n
    scale = flat(list(expected.values())).norm()  # (conv biases before BN have zero gradient)
    for k, p in state.upper.named_parameters():
        grad = (before[k] - p.detach()) / 0.05
        assert float((grad - expected[k]).norm() / scale) < 1e-9, k


# --- 6. gradient clipping at a value that binds ----------------------------------------------------


def _clip_scale(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s documented factor: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))


def test_upper_step_clips_backbone_and_head_jointly() -> None:
    clip = 0.01
    state, cfg = make_state([*SETTINGS, "bissl.solver_iterations=200", "bissl.solver_tol=1e-13",
                             f"bissl.upper_grad_clip={clip}"])
    pairs, down = batches(1)
    expected, _, _ = expected_upper_gradients(state, pairs, down, 0.1, 0.9, 0.3, 0.5)
    norm = float(flat(list(expected.values())).norm())
    assert norm > 5 * clip  # the clip binds
    scale = _clip_scale(norm, clip)
    before = {k: p.detach().clone() for k, p in state.upper.named_parameters()}
    system = build_system(state, stage_losses(cfg, state.lower)[1], pairs, cfg.bissl, INFO)
    upper_step(state, system, down, cfg.bissl, INFO)
    total = scale * flat(list(expected.values())).norm()
    for k, p in state.upper.named_parameters():  # first SGD step, no weight decay: p -= lr * g
        assert float(((before[k] - p.detach()) / 0.05 - scale * expected[k]).norm() / total) < 1e-9, k


def test_lower_step_clips_backbone_and_projector_jointly() -> None:
    """LARS by hand on the clipped gradient (pretext + proximal); biases and BN parameters are
    excluded from LARS here, so their update is lr times the clipped gradient itself."""
    lam, trust, tau, lr, wd, clip = 0.3, 0.02, 0.2, 0.7, 1e-3, 0.05
    state, cfg = make_state([f"bissl.lam={lam}", f"pretext.trust_coefficient={trust}", f"pretext.temperature={tau}",
                             f"bissl.lower_lr={lr}", f"bissl.lower_weight_decay={wd}", f"bissl.lower_grad_clip={clip}",
                             "pretext.lars_exclude_bias_and_norm=true"])
    pairs, _ = batches(2)
    net = copy.deepcopy(state.lower)
    params = dict(net.named_parameters())
    backbone = {k.removeprefix("backbone."): p for k, p in params.items() if k.startswith("backbone.")}
    theta_d = {k: p.detach() for k, p in state.upper.backbone.named_parameters()}
    loss = pretext_loss_reference(net, backbone, pairs, tau)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    for k in grads:
        if k.startswith("backbone."):
            grads[k] = grads[k] + lam * (params[k].detach() - theta_d[k.removeprefix("backbone.")])
    norm = float(flat(list(grads.values())).norm())
    assert norm > 5 * clip  # the clip binds
    scale = _clip_scale(norm, clip)
    expected = {}
    for k, p in params.items():
        g = scale * grads[k]
        if p.ndim <= 1:  # excluded: plain momentum SGD, first step
            expected[k] = p.detach() - lr * g
            continue
        d = g + wd * p.detach()
        q = trust * p.detach().norm() / (d.norm() + 1e-8)
        expected[k] = p.detach() - lr * q * d
    lower_step(state.lower, state.lower_opt, state.lower_sched, stage_losses(cfg, state.lower)[0], pairs, cfg.bissl,
               INFO, anchor=dict(state.upper.backbone.named_parameters()), lam=lam)
    for k, p in state.lower.named_parameters():
        assert rel(p.detach(), expected[k]) < 1e-12, k

