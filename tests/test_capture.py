"""rayattr.capture against brute-force float64 references (torch.func per-sample gradients,
or one backward per sample)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from rayattr.capture.projection import member_name, member_of
from rayattr.capture import (
    GradientCapture,
    ProjectionSpec,
    per_sample_loss,
    mixing_matrix,
    projection_matrices,
    sample_labels,
    sampled_label_losses,
)

D_IN, HID, HID2, D_OUT = 5, 7, 6, 4


class TinyNet(nn.Module):
    """Linear -> tanh -> Conv1D -> tanh -> (optional causal mixing) -> Linear without bias."""

    def __init__(self, mix: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HID)
        self.conv = Conv1D(HID2, HID)
        nn.init.normal_(self.conv.bias, std=0.3)
        self.head = nn.Linear(HID2, D_OUT, bias=False)
        self.mix = mix

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.fc1(x))))
        if self.mix and h.dim() == 3:  # causal running mean: couples positions along the sequence
            steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
            h = h.cumsum(dim=1) / steps
        return self.head(h)


def token_losses(out, y):
    """Per-token squared error, summed over features: (..., D_OUT) -> (...)."""
    return ((out - y) ** 2).sum(-1)


def sample_losses(model, x, y, weights=None):
    """Per-sample losses (B,): sum over tokens (times 0/1 weights) for sequence inputs."""
    t = token_losses(model(x), y)
    if t.dim() == 1:
        return t
    if weights is not None:
        t = t * weights
    return t.sum(1)


def reference_grads(model, x, y, weights=None):
    """Exact per-sample G (B, d_out, d_in[+1]) per captured layer, from torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi, wi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        t = token_losses(out, yi.unsqueeze(0))
        return (t * wi.unsqueeze(0)).sum() if wi is not None else t.sum()

    in_dims = (None, 0, 0, 0 if weights is not None else None)
    g = vmap(grad(one), in_dims=in_dims)(params, x, y, weights)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            w = g[f"{name}.weight"]
            w = w if isinstance(module, nn.Linear) else w.transpose(1, 2)
            if module.bias is not None:
                w = torch.cat([w, g[f"{name}.bias"].unsqueeze(-1)], dim=-1)
            out[name] = w
    return out


def project(spec, name, g):
    """P_s G P_a^T flattened, from an exact (B, d_out, d_in_aug) gradient; then M · that, the
    dense second stage, when the spec has one (mix)."""
    p_a, p_s = projection_matrices(spec, name, g.shape[2], g.shape[1])
    rows = torch.einsum("ro,boi,qi->brq", p_s.double(), g, p_a.double()).reshape(g.shape[0], -1)
    return rows if spec.mix is None else rows @ mixing_matrix(spec, name).double().T


def make_data(batch=4, seq=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq) if seq else (batch,)
    x = torch.randn(shape + (D_IN,), generator=gen, dtype=dtype)
    y = torch.randn(shape + (D_OUT,), generator=gen, dtype=dtype)
    return x, y


def make_model(mix=False, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinyNet(mix).to(dtype)


def assert_close(actual, expected, rtol=1e-10):
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.3e} > {rtol}"


# ----------------------------------------------------------------------------- exact mode
@pytest.mark.parametrize("seq", [0, 6], ids=["no-seq", "seq"])
@pytest.mark.parametrize("mix", [False, True], ids=["tokenwise", "mixing"])
def test_exact_matches_torch_func(seq, mix):
    model = make_model(mix)
    x, y = make_data(seq=seq)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=None)
    with cap:
        sample_losses(model, x, y).sum().backward()
    grads = cap.gradients()
    assert set(grads) == {"fc1", "conv", "head"}
    dims = cap.layer_dims()
    assert dims == {"fc1": HID * (D_IN + 1), "conv": HID2 * (HID + 1), "head": D_OUT * HID2}
    for name, g in grads.items():
        assert g.dtype == torch.float64 and g.shape == (4, dims[name])
        assert_close(g, ref[name].reshape(4, -1))


@pytest.mark.parametrize("kind, mix", [("gaussian", None), ("rademacher", None), ("gaussian", 4), ("rademacher", 9)])
def test_projected_is_projection_of_exact(kind, mix):
    model = make_model(mix=True)
    x, y = make_data()
    spec = ProjectionSpec(rank=3, seed=7, kind=kind, rank_out=2, mix=mix)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=spec)
    p = mix or 6
    assert cap.layer_dims() == {"fc1": p, "conv": p, "head": p}
    with cap:
        sample_losses(model, x, y).sum().backward()
    for name, g in cap.gradients().items():
        assert g.shape == (4, p)
        assert_close(g, project(spec, name, ref[name]))


def test_padding_mask_removes_padded_tokens():
    model = make_model(mix=False)
    x, y = make_data(batch=3, seq=5)
    lengths = torch.tensor([5, 2, 3])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    x = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 9.0))  # garbage in the pads
    ref = reference_grads(model, x, y, weights=mask.double())
    spec = ProjectionSpec(rank=4, seed=1)
    for projection, use_ctx in [(None, False), (spec, True)]:
        cap = GradientCapture(model, projection=projection)
        with cap:
            if use_ctx:
                with cap.mask(mask):  # loss includes the pads; the mask must drop them
                    sample_losses(model, x, y).sum().backward()
            else:
                cap.set_mask(mask)
                sample_losses(model, x, y).sum().backward()
        for name, g in cap.gradients().items():
            expected = ref[name].reshape(3, -1) if projection is None else project(spec, name, ref[name])
            assert_close(g, expected)
    # Without the mask the garbage tokens do contribute: the check above is not vacuous.
    cap = GradientCapture(model, projection=None)
    with cap:
        sample_losses(model, x, y).sum().backward()
    assert (cap.gradients()["fc1"] - ref["fc1"].reshape(3, -1)).norm() > 1e-3


def test_mask_broadcasts_over_extra_middle_dims():
    # Input (B, S, H, d): the (B, S) mask covers every H slice of a padded token.
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    cap = GradientCapture(lin, mask=mask)
    with cap:
        (lin(x) ** 2).sum().backward()
    keep = mask.bool()[:, :, None, None].double()
    xm = torch.cat([x, torch.ones(2, 4, 5, 1, dtype=torch.float64)], -1) * keep
    expected = torch.einsum("bshi,bshj->bij", 2 * lin(x).detach() * keep, xm).reshape(2, -1)
    assert_close(cap.gradients()[""], expected)


def test_mask_shape_mismatch_is_a_clear_error():
    model = make_model()
    x, y = make_data(batch=2, seq=4)
    cap = GradientCapture(model, mask=torch.ones(2, 5))
    with cap, pytest.raises(ValueError, match="padding mask"):
        model(x)
    with pytest.raises(ValueError, match="batch, seq"):
        cap.set_mask(torch.ones(2, 4, 1))


# ------------------------------------------------------------ loss reduction and scaling
def test_mean_loss_and_fp16_style_scale_are_divided_out():
    model = make_model(mix=True)
    x, y = make_data()
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=None)
    with cap:
        cap.loss_scale = 1024.0 / 4  # mean over B=4, then scaled by a dynamic loss scale of 1024
        (sample_losses(model, x, y).mean() * 1024.0).backward()
    for name, g in cap.gradients().items():
        assert_close(g, ref[name].reshape(4, -1))
    with pytest.raises(ValueError, match="loss_scale"):
        cap.loss_scale = 0.0


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background-thread"])
def test_gradient_accumulation_and_forward_only_passes(background):
    model = make_model(mix=True)
    batches = [make_data(batch=b, seed=s) for b, s in [(3, 1), (2, 2)]]
    spec = ProjectionSpec(rank=3, seed=0)
    cap = GradientCapture(model, projection=spec, background=background)
    with cap:
        for i, (x, y) in enumerate(batches):
            cap.loss_scale = 1.0 / (len(batches) * x.shape[0])  # DeepSpeed-style mean / accumulation
            (sample_losses(model, x, y).mean() / len(batches)).backward()
            model(x).sum()  # forward with grad enabled but never backpropagated
            with torch.no_grad():
                model(x)  # evaluation pass
    grads = cap.gradients()
    refs = [reference_grads(model, x, y) for x, y in batches]
    for name, g in grads.items():
        assert g.shape == (5, 9)
        expected = torch.cat([project(spec, name, r[name]) for r in refs])
        assert_close(g, expected)
    with cap:  # re-entering clears
        pass
    assert all(g.shape[0] == 0 for g in cap.gradients().values())


def test_hooks_only_live_inside_the_block_and_reset_clears():
    model = make_model()
    x, y = make_data()
    cap = GradientCapture(model, projection=ProjectionSpec(rank=2))
    sample_losses(model, x, y).sum().backward()  # before entering: nothing recorded
    with cap:
        out = sample_losses(model, x, y).sum()
        out.backward()
        assert cap.gradients()["fc1"].shape == (4, 4)
        cap.reset()
        assert cap.gradients()["fc1"].shape == (0, 4)
        pending = sample_losses(model, x, y).sum()
    pending.backward()  # backward after the block: ignored
    sample_losses(model, x, y).sum().backward()
    assert cap.gradients()["fc1"].shape == (0, 4)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


class Twice(nn.Module):
    """One Linear applied twice per forward: its parameter gradient sums both calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_reused_layer_sums_its_calls():
    torch.manual_seed(0)
    model = Twice().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    cap = GradientCapture(model)
    with cap:
        (model(x) ** 2).sum().backward()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(lambda p, xi: (functional_call(model, p, (xi,)) ** 2).sum()), in_dims=(None, 0))(params, x)
    expected = torch.cat([g["lin.weight"], g["lin.bias"].unsqueeze(-1)], -1).reshape(3, -1)
    assert list(cap.gradients()) == ["lin"]
    assert_close(cap.gradients()["lin"], expected)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background-thread"])
def test_two_forwards_of_different_batches_need_a_boundary(background):
    model = make_model()
    x1, y1 = make_data(batch=3, seed=1)
    x2, y2 = make_data(batch=2, seed=2)
    cap = GradientCapture(model, background=background)
    with cap, pytest.raises(RuntimeError):
        (sample_losses(model, x1, y1).sum() + sample_losses(model, x2, y2).sum()).backward()
        cap.gradients()
    with cap:  # with an explicit boundary the rows come out per micro-batch, in forward order
        loss = sample_losses(model, x1, y1).sum()
        cap.next_micro_batch()
        (loss + sample_losses(model, x2, y2).sum()).backward()
    refs = [reference_grads(model, x, y) for x, y in [(x1, y1), (x2, y2)]]
    assert_close(cap.gradients()["conv"], torch.cat([r["conv"].reshape(len(r["conv"]), -1) for r in refs]))


def test_layer_patterns_and_errors():
    model = make_model()
    cap = GradientCapture(model, projection=ProjectionSpec(rank=2, rank_in=3), layers=["fc*", "head"])
    assert cap.layer_dims() == {"fc1": 6, "head": 6}
    with pytest.raises(ValueError, match="matches"):
        GradientCapture(model, layers=["nope.*"])
    model.fc1.weight.requires_grad_(False)
    assert "fc1" not in GradientCapture(model).layer_dims()
    with pytest.raises(TypeError, match="ProjectionSpec"):
        GradientCapture(model, projection={"rank": 2})


def test_bf16_autocast_accumulates_in_float32():
    model = make_model(mix=True, dtype=torch.float32)
    x, y = make_data(batch=4, seq=16, dtype=torch.float32)
    ref = reference_grads(model.double(), x.double(), y.double())
    model.float()
    spec = ProjectionSpec(rank=4, seed=3)
    cap = GradientCapture(model, projection=spec)
    with cap:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = token_losses(model(x).float(), y).sum(1)
        losses.sum().backward()
    for name, g in cap.gradients().items():
        assert g.dtype == torch.float32
        assert_close(g.double(), project(spec, name, ref[name]), rtol=5e-2)


# ----------------------------------------------------------------------- GPT-2 end to end
def test_gpt2_padded_batch_matches_one_backward_per_sample():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config).double()
    model.config.use_cache = False
    ids = torch.randint(0, 50, (3, 8))
    lengths = [8, 5, 3]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    layers = ["transformer.h.*"]
    spec = ProjectionSpec(rank=4, seed=5, kind="rademacher")

    # Reference: each sample alone, unpadded, one backward each.
    selected = {n: m for n, m in model.named_modules() if n.startswith("transformer.h.") and isinstance(m, Conv1D)}
    ref = {n: [] for n in selected}
    for i, n in enumerate(lengths):
        model.zero_grad()
        logits = model(ids[i : i + 1, :n]).logits
        per_sample_loss(logits[:, :-1], ids[i : i + 1, 1:n]).sum().backward()
        for name, m in selected.items():
            ref[name].append(torch.cat([m.weight.grad.t(), m.bias.grad[:, None]], 1))  # Conv1D stores W^T
    ref = {n: torch.stack(v) for n, v in ref.items()}

    for projection in (None, spec):
        cap = GradientCapture(model, projection=projection, layers=layers, mask=mask)
        assert set(cap.layer_dims()) == set(selected)
        with cap:
            logits = model(ids, attention_mask=mask).logits
            per_sample_loss(logits[:, :-1], labels[:, 1:]).sum().backward()
        for name, g in cap.gradients().items():
            expected = ref[name].reshape(3, -1) if projection is None else project(spec, name, ref[name])
            assert_close(g, expected, rtol=1e-9)


# ---------------------------------------------------------------------------- projections
def test_projection_matrices_are_regenerable_and_scaled():
    spec = ProjectionSpec(rank=64, seed=11)
    p_a, p_s = projection_matrices(spec, "layer.0", 401, 300)
    assert p_a.shape == (64, 401) and p_s.shape == (64, 300) and p_a.dtype == torch.float32
    again = projection_matrices(ProjectionSpec.from_dict(spec.to_dict()), "layer.0", 401, 300)
    assert torch.equal(p_a, again[0]) and torch.equal(p_s, again[1])
    assert not torch.equal(p_a, projection_matrices(spec, "layer.1", 401, 300)[0])
    assert not torch.equal(p_a, projection_matrices(ProjectionSpec(rank=64, seed=12), "layer.0", 401, 300)[0])
    # Same shape on both sides must still give independent factors.
    sq_a, sq_s = projection_matrices(spec, "sq", 300, 300)
    assert not torch.equal(sq_a, sq_s)
    assert abs(p_a.var().item() * 64 - 1) < 0.05  # N(0, 1/r)
    rad, _ = projection_matrices(ProjectionSpec(rank=16, kind="rademacher"), "x", 50, 10)
    assert torch.equal(rad.abs(), torch.full_like(rad, 1 / math.sqrt(16)))
    assert 0.35 < (rad > 0).float().mean().item() < 0.65


def test_projection_spec_validation():
    assert ProjectionSpec(rank=8, rank_in=4).dim == 32
    mixed = ProjectionSpec(rank=8, mix=20)
    assert mixed.dim == 20 and ProjectionSpec.from_dict(mixed.to_dict()) == mixed
    m = mixing_matrix(mixed, "layer")
    assert m.shape == (20, 64) and torch.equal(m, mixing_matrix(ProjectionSpec.from_dict(mixed.to_dict()), "layer"))
    assert not torch.equal(m, mixing_matrix(mixed, "other"))
    with pytest.raises(ValueError, match="mix"):
        mixing_matrix(ProjectionSpec(rank=8), "layer")
    for bad in [dict(rank=0), dict(kind="sparse"), dict(rank=4, rank_out=-1), dict(seed="a"), dict(mix=0),
                dict(mix=True)]:
        with pytest.raises(ValueError):
            ProjectionSpec(**bad)
    with pytest.raises(ValueError, match="unknown"):
        ProjectionSpec.from_dict({"rank": 4, "rnak": 2})


@pytest.mark.parametrize("mix", [None, 5])
def test_members_project_each_layer_with_matrices_of_their_own(mix):
    """ProjectionSpec.members: every layer is captured once per member, member j as
    `<layer>~j` with its own matrices (member 0 under the layer's own name: a one-member capture's
    rows); `only(j)` gives one member rows and the others none."""
    model = make_model(mix=True)
    x, y = make_data()
    spec = ProjectionSpec(rank=3, seed=7, rank_out=2, mix=mix, members=3)
    ref = reference_grads(model, x, y)
    cap = GradientCapture(model, projection=spec)
    assert cap.module_names() == ["fc1", "conv", "head"]
    assert cap.layer_names() == [member_name(n, j) for n in ("fc1", "conv", "head") for j in range(3)]
    assert member_of("conv~2") == ("conv", 2) and member_of("conv") == ("conv", 0)
    one = GradientCapture(model, projection=dataclasses.replace(spec, members=1))
    with cap, one:
        sample_losses(model, x, y).sum().backward()
    grads = cap.gradients()
    for name, G in ref.items():
        rows = [grads[member_name(name, j)] for j in range(3)]
        for j, g in enumerate(rows):
            assert_close(g, project(spec, member_name(name, j), G))
        assert torch.equal(rows[0], one.gradients()[name])
        assert not torch.allclose(rows[1], rows[2])
    with cap, cap.only(1):
        sample_losses(model, x, y).sum().backward()
    got = cap.gradients()
    for name, G in ref.items():
        assert got[name].shape == (0, spec.dim) and got[member_name(name, 2)].shape == (0, spec.dim)
        assert_close(got[member_name(name, 1)], project(spec, member_name(name, 1), G))
    with pytest.raises(ValueError, match="members"):
        ProjectionSpec(members=0)


# ---------------------------------------------------------------------------- losses
def test_per_sample_loss_sum_mean_and_ignore_index():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 0], [4, -100, -100, -100]])
    manual = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for s in range(4):
            if labels[b, s] != -100:
                manual[b] -= torch.log_softmax(logits[b, s], -1)[labels[b, s]]
    assert torch.allclose(per_sample_loss(logits, labels), manual)
    assert torch.allclose(per_sample_loss(logits, labels, reduction="mean"), manual / torch.tensor([3.0, 1.0]))
    flat = per_sample_loss(logits[:, 0], labels[:, 0].clamp_min(0))
    assert flat.shape == (2,)
    with pytest.raises(ValueError, match="reduction"):
        per_sample_loss(logits, labels, reduction="none")
    with pytest.raises(ValueError, match="class dim"):
        per_sample_loss(logits, labels[:, :2])


def test_sampled_labels_follow_the_model():
    peaked = torch.full((3, 4, 6), -1e4)
    argmax = torch.tensor([[0, 5, 2, 3], [1, 1, 4, 0], [2, 3, 5, 5]])
    peaked.scatter_(-1, argmax.unsqueeze(-1), 1e4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_labels(peaked, generator=gen), argmax)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    masked = sample_labels(peaked, generator=gen, mask=mask)
    assert (masked[1, 2:] == -100).all() and torch.equal(masked[mask], argmax[mask])


def test_sampled_label_gradients_estimate_the_fisher():
    # For logits z, the pseudo-gradient is p - e_y with y ~ p; its mean is 0 and its second
    # moment is the cross-entropy Gauss-Newton diag(p) - p p^T.
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(z, -1)[0]
    n = 20000
    zs = z.repeat(n, 1).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    losses = sampled_label_losses(zs, generator=gen)
    assert losses.shape == (n,)
    (g,) = torch.autograd.grad(losses.sum(), zs)
    assert g.mean(0).abs().max() < 0.02
    fisher = torch.diag(p) - torch.outer(p, p)
    assert (g.T @ g / n - fisher).abs().max() < 0.02
    # (B, S, C) logits with a mask: masked tokens add nothing.
    logits = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    full = sampled_label_losses(logits, generator=torch.Generator().manual_seed(1), mask=mask)
    labels = sample_labels(logits, generator=torch.Generator().manual_seed(1), mask=mask)
    assert torch.allclose(full, per_sample_loss(logits, labels))
    # reduction="mean" (the pipeline's per-sample loss): the summed pseudo-loss over √T, not T
    mean = sampled_label_losses(logits, generator=torch.Generator().manual_seed(1), mask=mask, reduction="mean")
    assert torch.allclose(mean * mask.sum(1).double().sqrt().float(), full) and not torch.allclose(mean, full)


def test_sampled_label_gradients_of_a_mean_loss_estimate_its_gauss_newton():
    # A sample's mean loss (1/T) Σ_τ ℓ_τ has Gauss-Newton (1/T) diag_τ(diag(p_τ) - p_τ p_τᵀ) in
    # its logits. The pseudo-gradients' second moment must be that, not T times smaller (the
    # plain mean of the sampled token losses), nor T times larger (their sum).
    torch.manual_seed(0)
    z = torch.randn(1, 5, 4, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # T = 4 predicted tokens
    n = 40000
    zs = z.repeat(n, 1, 1).requires_grad_(True)
    losses = sampled_label_losses(zs, generator=torch.Generator().manual_seed(0), mask=mask.repeat(n, 1),
                                  reduction="mean")
    (g,) = torch.autograd.grad(losses.sum(), zs)
    g = g.reshape(n, -1)
    p = torch.softmax(z[0], -1)
    ggn = torch.block_diag(*[(torch.diag(p[t]) - torch.outer(p[t], p[t])) * mask[0, t] / 4 for t in range(5)])
    assert (g.T @ g / n - ggn).abs().max() < 0.1 * ggn.abs().max()


def test_label_seeds_differ_by_micro_batch_and_capture_seed_and_survive_the_process():
    """Every micro-batch of a step, and every capture seed, draws its own labels (one seed for
    two micro-batches would correlate their samples' labels; a run recorded at another capture
    seed must be an independent estimate); capture seed 0's first micro-batch keeps the seed
    earlier runs were recorded with; and the seed does not depend on the process's hash salt."""
    import itertools
    import subprocess
    import sys

    from rayattr.capture.pseudo import label_seed

    grid = list(itertools.product([0, 3], [0, 1, 2], [0, 5, 9], [0, 1], [0, 1, 2]))  # train, capture, step, rank, micro
    seeds = [label_seed(*key) for key in grid]
    assert len(set(seeds)) == len(grid) and all(0 <= x < 2**31 for x in seeds)
    assert label_seed(3, 0, 9, 1) == hash((3, 9, 1)) % 2**31
    code = "from rayattr.capture.pseudo import label_seed; print([label_seed(*k) for k in %r])" % (grid,)
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": salt})
        assert out.stdout.strip() == str(seeds)
