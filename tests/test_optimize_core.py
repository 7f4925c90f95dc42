"""torch_wsl.optimize's mechanism: rules keyed by class, per-instance patches, the report, restore()."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import torch_wsl
from torch_wsl.patching import _core


def _mlp_with_norms() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 8), nn.RMSNorm(8, eps=1e-6))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
        model[4].weight.normal_()
    return model


def test_torch_norms_are_patched_on_the_instance_and_restored():
    model = _mlp_with_norms()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = torch_wsl.optimize(model)
    assert report.count("norms", "LayerNorm") == 1 and report.count("norms", "RMSNorm") == 1
    assert report.total == 2 and report.already == 0
    # Only the instance changed: the class, the parameters and the state_dict keys did not.
    assert type(model[1]) is nn.LayerNorm and "forward" in model[1].__dict__
    assert "forward" not in nn.LayerNorm.__dict__ or nn.LayerNorm.forward is ref[1].forward.__func__
    assert list(model.state_dict()) == keys
    x = torch.randn(5, 3, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = model(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=1e-5)  # weight gradients sum in another order
    torch.testing.assert_close(x.grad, x_ref.grad)
    # The fused kernel runs: one dispatched op per norm instead of torch's decomposition.
    with torch.profiler.profile() as prof:
        model(x)
    names = {e.name for e in prof.events()}
    assert "torch_wsl::layer_norm" in names and "torch_wsl::rms_norm" in names
    assert torch_wsl.restore(model) == 2
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch_wsl.restore(model) == 0


def test_optimize_is_idempotent_and_switches_select_kinds():
    model = _mlp_with_norms()
    assert torch_wsl.optimize(model, norms=False).total == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    first = torch_wsl.optimize(model)
    second = torch_wsl.optimize(model)
    assert second.total == first.total == 2 and second.already == 2
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    torch_wsl.optimize(model)
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards


def test_two_models_in_one_process_differ():
    a, b = _mlp_with_norms(), _mlp_with_norms()
    torch_wsl.optimize(a)
    assert "forward" in a[1].__dict__ and "forward" not in b[1].__dict__


def test_subclass_that_overrides_forward_is_left_alone_with_the_reason():
    class Mine(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class Same(nn.LayerNorm):  # keeps LayerNorm's forward: its rule applies
        pass

    model = nn.Sequential(Mine(4), Same(4))
    report = torch_wsl.optimize(model)
    assert report.count("norms", "Same") == 1 and report.count("norms", "Mine") == 0
    assert ("0", "Mine", "subclass of LayerNorm that overrides forward") in report.left_alone
    assert "Mine" in str(report) and "overrides forward" in str(report)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model[0](x), nn.functional.layer_norm(x, (4,), model[0].weight, model[0].bias) * 2)


def test_a_forward_replaced_by_another_library_is_kept():
    model = _mlp_with_norms()
    theirs = lambda x: x  # noqa: E731  (as accelerate's hooks set module.forward)
    model[1].forward = theirs
    report = torch_wsl.optimize(model)
    assert model[1].forward is theirs
    assert any(path == "1" and "already replaced" in why for path, _, why in report.left_alone)
    assert report.count("norms") == 1  # the RMSNorm still is


def test_unknown_target_looking_classes_are_reported():
    class ToyAttention(nn.Module):
        def forward(self, x):
            return x

    report = torch_wsl.optimize(nn.Sequential(ToyAttention(), nn.Linear(2, 2), nn.Dropout()))
    assert [(cls, why) for _, cls, why in report.left_alone] == [("ToyAttention", "no torch_wsl rule for this class")]


def test_model_on_a_device_without_kernels_is_left_unchanged():
    model = _mlp_with_norms().to("meta")
    report = torch_wsl.optimize(model)
    assert report.total == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "meta" in report.left_alone[0][2] and "cpu and cuda" in report.left_alone[0][2]


def test_patched_norm_falls_back_when_moved_to_another_device_or_shape():
    model = _mlp_with_norms()
    torch_wsl.optimize(model)
    # A LayerNorm called on a tensor whose last dims do not match runs the class forward (and its error).
    with pytest.raises(RuntimeError, match="normalized_shape"):
        model[1](torch.randn(3, 5))
    meta = torch.randn(2, 16, device="meta")
    assert model[1].to("meta")(meta).device.type == "meta"


def test_checkpoint_round_trip_between_optimized_and_plain():
    model = _mlp_with_norms()
    torch_wsl.optimize(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    plain = _mlp_with_norms()
    for p in plain.parameters():
        p.data.zero_()
    buf.seek(0)
    plain.load_state_dict(torch.load(buf))
    x = torch.randn(2, 8)
    torch.testing.assert_close(plain(x), model(x))
    model.load_state_dict(plain.state_dict())


def test_deepcopy_of_an_optimized_model_is_optimized_on_its_own():
    model = _mlp_with_norms()
    torch_wsl.optimize(model)
    twin = copy.deepcopy(model)
    assert twin[1].forward.__self__ is twin[1]
    x = torch.randn(2, 8)
    torch.testing.assert_close(twin(x), model(x))
    torch_wsl.restore(twin)
    assert "forward" in model[1].__dict__


def test_register_rejects_bad_kinds_and_repeats():
    with pytest.raises(ValueError, match="kind must be one of"):
        _core.register("x.Y", "attention", lambda m: "no")
    with pytest.raises(ValueError, match="already has a rule"):
        _core.register("torch.nn.modules.normalization.LayerNorm", "norms", lambda m: "no")


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        torch_wsl.optimize(lambda x: x)
