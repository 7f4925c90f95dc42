"""LayerNorm / RMSNorm (plain and with the fused residual add)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_wsl.nn.functional as TF

from . import BadInput, OpInfo, Sample, make, register

# (shape, normalized_shape): odd sizes, a vector-width row, one longer than the CUDA warp path, an empty batch.
SHAPES = [((4, 3, 16), (16,)), ((7, 769), (769,)), ((2, 5, 6), (5, 6)), ((3, 257), (257,)), ((0, 16), (16,)),
          ((5, 1), (1,))]


def _norm_samples(with_residual: bool, with_bias: bool):
    def samples(device, dtype, requires_grad):
        g = torch.Generator().manual_seed(0)
        for i, (shape, ns) in enumerate(SHAPES):
            for noncontig in (False, True) if i < 2 else (False,):
                x = make(shape, dtype, device, requires_grad=requires_grad, noncontiguous=noncontig, generator=g)
                args = [x]
                if with_residual:
                    args.append(make(shape, dtype, device, requires_grad=requires_grad, generator=g))
                args.append(ns)
                w = make(ns, dtype, device, requires_grad=requires_grad, low=0.5, high=1.5, generator=g)
                args.append(w if i != 3 else None)
                if with_bias:
                    args.append(make(ns, dtype, device, requires_grad=requires_grad, generator=g) if i != 3 else None)
                name = f"{list(shape)}{'-noncontig' if noncontig else ''}{'-noaffine' if i == 3 else ''}"
                # rms_norm's default eps depends on the input dtype, which a float64 reference cannot see
                # (test_norm.py checks the default); pass one.
                kwargs = {} if with_bias else {"eps": 1e-6}
                yield Sample(tuple(args), kwargs, name=name, opcheck=i in (0, 3, 4))

    return samples


def _ref_layer_norm(x, ns, w=None, b=None, eps=1e-5):
    return F.layer_norm(x, ns, w, b, eps)


def _ref_add_layer_norm(x, r, ns, w=None, b=None, eps=1e-5):
    s = x + r
    return F.layer_norm(s, ns, w, b, eps), s


def _ref_rms_norm(x, ns, w=None, eps=None):
    return F.rms_norm(x, ns, w, eps if eps is not None else torch.finfo(torch.float32).eps)


def _ref_add_rms_norm(x, r, ns, w=None, eps=None):
    s = x + r
    return _ref_rms_norm(s, ns, w, eps), s


def _bad_inputs(op):
    def bad():
        x = torch.randn(4, 8)
        w = torch.randn(8)
        name = op.__name__
        res = (torch.randn(4, 8),) if name.startswith("add_") else ()
        yield BadInput((x, *res, (8,), torch.randn(7)), match=rf"torch_wsl\.{name}: expected weight to have shape "
                       r"normalized_shape \[8\], got \[7\]", name="weight-shape")
        yield BadInput((x.long(), *res, (8,)), match=r"expected input to have a floating dtype.*got int64",
                       name="int-input")
        yield BadInput((x, *res, (8,), w.int()), match=r"expected weight to have a floating dtype.*got int32",
                       name="int-weight")
        yield BadInput((x, *res, (4,)), match=r"expected normalized_shape \[4\] to match the trailing dimensions of "
                       r"input, got input of shape \[4, 8\]", name="trailing-dims")
        yield BadInput((x, *res, ()), match=r"normalized_shape to name at least one dimension", name="empty-shape")
        if res:
            yield BadInput((x, torch.randn(4, 7), (8,)), match=r"expected residual to have the shape of input \[4, 8\]",
                           name="residual-shape")
            yield BadInput((x, torch.randn(4, 8).half(), (8,)), match=r"expected residual to have the dtype of input "
                           r"\(float32\), got float16", name="residual-dtype")
        yield BadInput((x, *res, (8,), w), {"eps": -1.0}, match=r"expected eps >= 0, got -1", name="eps")

    return bad


register(
    OpInfo("layer_norm", TF.layer_norm, _ref_layer_norm, _norm_samples(False, True), _bad_inputs(TF.layer_norm)),
    OpInfo("add_layer_norm", TF.add_layer_norm, _ref_add_layer_norm, _norm_samples(True, True),
           _bad_inputs(TF.add_layer_norm)),
    OpInfo("rms_norm", TF.rms_norm, _ref_rms_norm, _norm_samples(False, False), _bad_inputs(TF.rms_norm)),
    OpInfo("add_rms_norm", TF.add_rms_norm, _ref_add_rms_norm, _norm_samples(True, False),
           _bad_inputs(TF.add_rms_norm)),
)


# RMSNorm as the model families compute it (offset, casting modes): the
# reference rounds nothing, so these are checked at the dtype's tolerance here
# and bit for bit against transformers in test_norm.py.
def _rms_variant(fn, offset, mode):
    def f(*args, **kwargs):
        return fn(*args, **{"offset": offset, "casting_mode": mode, **kwargs})

    f.__name__ = fn.__name__
    return f


def _ref_rms_offset(x, ns, w=None, eps=None):
    return _ref_rms_norm(x, ns, w + 1.0, eps)


def _ref_add_rms_offset(x, r, ns, w=None, eps=None):
    return _ref_add_rms_norm(x, r, ns, w + 1.0, eps)


def _rms_variant_bad_inputs(fn):
    def bad():
        x = torch.randn(4, 8)
        w = torch.randn(8)
        name = fn.__name__
        res = (torch.randn(4, 8),) if name.startswith("add_") else ()
        yield BadInput((x, *res, (8,), w), {"casting_mode": "fp32"}, name="casting-mode",
                       match=rf"torch_wsl\.{name}: expected casting_mode to be one of 'torch', 'gemma', 'llama', "
                       r"got 'fp32'")
        yield BadInput((x, *res, (8,)), {"offset": 1.0}, name="offset-without-weight",
                       match=r"expected weight to be given with offset 1, got None")

    return bad


def _weighted(samples):
    """Only the samples with a weight (offset needs one)."""
    def gen(device, dtype, requires_grad):
        for s in samples(device, dtype, requires_grad):
            if s.args[-1] is not None:
                yield s
    return gen


register(
    OpInfo("rms_norm_gemma", _rms_variant(TF.rms_norm, 1.0, "gemma"), _ref_rms_offset,
           _weighted(_norm_samples(False, False)), _rms_variant_bad_inputs(TF.rms_norm)),
    OpInfo("rms_norm_llama", _rms_variant(TF.rms_norm, 0.0, "llama"), _ref_rms_norm, _norm_samples(False, False),
           tol_scale=2.0),
    OpInfo("add_rms_norm_gemma", _rms_variant(TF.add_rms_norm, 1.0, "gemma"), _ref_add_rms_offset,
           _weighted(_norm_samples(True, False)), _rms_variant_bad_inputs(TF.add_rms_norm)),
    OpInfo("add_rms_norm_llama", _rms_variant(TF.add_rms_norm, 0.0, "llama"), _ref_add_rms_norm,
           _norm_samples(True, False), tol_scale=2.0),
)
