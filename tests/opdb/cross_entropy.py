"""Cross-entropy (softcap, label smoothing, class weights), its in-place loss-and-gradient form, and the
chunked linear cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torch_wsl.ops.cross_entropy import cross_entropy, cross_entropy_loss_grad_, linear_cross_entropy

from . import BadInput, OpInfo, Sample, make, register


def _softcapped(x, softcap):
    return softcap * torch.tanh(x / softcap) if softcap is not None else x


def _ref_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                       softcap=None):
    # torch takes int64 targets only; torch_wsl also takes int32
    return F.cross_entropy(_softcapped(input, softcap), target.long(), weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


def _targets(rows, classes, g, ignore_index=-100, all_ignored=False):
    """Class indices with the bounds 0 and C-1 present and one ignored row (when there are 3 or more)."""
    t = torch.randint(0, classes, (rows,), generator=g)
    if all_ignored:
        return torch.full((rows,), ignore_index, dtype=torch.long)
    if rows >= 1:
        t[0] = classes - 1
    if rows >= 2:
        t[1] = 0
    if rows >= 3:
        t[2] = ignore_index
    return t


# (rows, classes, options): the vocabularies with a few tokens, tiny and odd class counts, an empty
# batch, all targets ignored, non-contiguous rows, class weights, label smoothing, softcap, every reduction.
CE_CASES = [
    (5, 1, {}),
    (6, 7, {"reduction": "none"}),
    (4, 7, {"label_smoothing": 0.1, "weighted": True, "reduction": "sum"}),
    (3, 32000, {}),
    (3, 128256, {"softcap": 30.0}),
    (3, 151936, {"label_smoothing": 0.1}),
    (3, 256000, {"reduction": "sum", "int32": True}),
    (0, 16, {"reduction": "sum"}),
    (0, 16, {"reduction": "none"}),
    (5, 33, {"all_ignored": True, "reduction": "sum"}),
    (7, 33, {"noncontig": True, "weighted": True}),
    (6, 2049, {"label_smoothing": 0.2, "weighted": True, "softcap": 5.0, "reduction": "none"}),
    (9, 100, {"ignore_index": 5, "label_smoothing": 0.3}),
    (8, 300, {"rowstride": True, "weighted": True, "reduction": "sum", "softcap": 2.0}),
]


def _ce_args(rows, classes, opts, dtype, device, requires_grad, g):
    ignore = opts.get("ignore_index", -100)
    if opts.get("rowstride"):  # rows of a wider buffer: contiguous classes, row stride != classes
        x = make((rows, classes + 13), dtype, device, requires_grad=False, generator=g)[:, :classes]
        x = x.detach().requires_grad_(requires_grad)
    else:
        x = make((rows, classes), dtype, device, requires_grad=requires_grad,
                 noncontiguous=opts.get("noncontig", False), generator=g)
    t = _targets(rows, classes, g, ignore, opts.get("all_ignored", False)).to(device)
    if opts.get("int32"):
        t = t.int()
    w = make((classes,), dtype, device, low=0.25, high=2.0, generator=g) if opts.get("weighted") else None
    return x, t, w, ignore


def _ce_name(rows, classes, opts):
    flags = "-".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in opts.items())
    return f"{rows}x{classes}" + (f"-{flags}" if flags else "")


def _ce_samples(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    for i, (rows, classes, opts) in enumerate(CE_CASES):
        x, t, w, ignore = _ce_args(rows, classes, opts, dtype, device, requires_grad, g)
        kwargs = {"reduction": opts.get("reduction", "mean"), "label_smoothing": opts.get("label_smoothing", 0.0),
                  "softcap": opts.get("softcap"), "ignore_index": ignore}
        yield Sample((x, t, w), kwargs, name=_ce_name(rows, classes, opts),
                     opcheck=classes <= 2049 and i in (1, 2, 7, 9, 10, 11, 12))


def _ce_bad_inputs():
    x = torch.randn(4, 7)
    t = torch.tensor([0, 6, -100, 3])
    op = r"torch_wsl\.cross_entropy: expected "
    yield BadInput((x, torch.tensor([0, 7, 1, 2])), match=op + r"target values to be class indices in \[0, 7\) or "
                   r"ignore_index \(-100\), got 7 at position 1", name="target-too-large", data_dependent=True)
    yield BadInput((x, torch.tensor([0, 1, -1, 2])), match=op + r"target values to be class indices in \[0, 7\) or "
                   r"ignore_index \(-100\), got -1 at position 2", name="target-negative", data_dependent=True)
    yield BadInput((x, torch.tensor([0, 1, -100, 2])), {"ignore_index": 3}, match=op + r"target values .* or "
                   r"ignore_index \(3\), got -100 at position 2", name="target-other-ignore", data_dependent=True)
    yield BadInput((x, torch.softmax(x, 1)), match=op + r"target to hold class indices as int64 or int32 \(class "
                   r"probabilities are not supported\), got float32", name="float-target")
    yield BadInput((x.long(), t), match=op + r"input to have a floating dtype.*got int64", name="int-input")
    yield BadInput((torch.tensor(1.0), torch.tensor(0)), match=op + r"input to have 2 dimensions \[batch, classes\], "
                   r"got shape \[\]", name="0-dim-input")
    yield BadInput((torch.randn(4, 0), t), match=op + r"input to have at least one class", name="no-classes")
    yield BadInput((x, torch.tensor([0, 1, 2])), match=op + r"target to have shape \[4\] \(one class index per row "
                   r"of input\), got shape \[3\]", name="target-shape")
    yield BadInput((x, t, torch.ones(6)), match=op + r"weight to have shape \[7\] \(one weight per class\), got shape "
                   r"\[6\]", name="weight-shape")
    yield BadInput((x, t, torch.ones(7, dtype=torch.int32)), match=op + r"weight to have a floating dtype",
                   name="int-weight")
    yield BadInput((x, t), {"reduction": "avg"}, match=op + r"reduction to be 'none', 'mean' or 'sum', got 'avg'",
                   name="reduction")
    yield BadInput((x, t), {"label_smoothing": 1.5}, match=op + r"label_smoothing to be in \[0, 1\], got 1.5",
                   name="label-smoothing")
    yield BadInput((x, t), {"softcap": 0.0}, match=op + r"softcap to be a positive finite number or None, got 0",
                   name="softcap")


# ---------------------------------------------------------------- the in-place loss-and-gradient operator


def _loss_grad(input, target, grad_scale, weight=None, ignore_index=-100, label_smoothing=0.0, *, softcap=None):
    """(per-row losses, gradient): the operator run on a copy of input with input's strides."""
    buf = torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device=input.device)
    buf.copy_(input)
    loss = cross_entropy_loss_grad_(buf, target, grad_scale, weight, ignore_index, label_smoothing, softcap=softcap)
    return loss, buf


def _ref_loss_grad(input, target, grad_scale, weight=None, ignore_index=-100, label_smoothing=0.0, *, softcap=None):
    x = input.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = F.cross_entropy(_softcapped(x, softcap), target.long(), weight, ignore_index=ignore_index,
                                 reduction="none", label_smoothing=label_smoothing)
        (grad,) = torch.autograd.grad((losses * grad_scale).sum(), x)
    return losses.detach(), grad


def _loss_grad_samples(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(1)
    cases = [(5, 1, {}), (6, 7, {"weighted": True, "label_smoothing": 0.1}), (3, 32000, {"softcap": 30.0}),
             (0, 9, {}), (7, 300, {"rowstride": True, "label_smoothing": 0.2}), (5, 33, {"all_ignored": True}),
             (2, 128256, {"int32": True})]
    for i, (rows, classes, opts) in enumerate(cases):
        x, t, w, ignore = _ce_args(rows, classes, opts, dtype, device, False, g)
        # one scale, or one per row (the linear cross-entropy's reduction "none" backward)
        scale = (torch.tensor(0.25, device=device) if i % 2 == 0
                 else make((rows,), torch.float32, device, low=0.5, high=1.5, generator=g))
        yield Sample((x, t, scale, w), {"label_smoothing": opts.get("label_smoothing", 0.0),
                                        "softcap": opts.get("softcap"), "ignore_index": ignore},
                     name=_ce_name(rows, classes, opts), opcheck=classes <= 300)


def _loss_grad_bad_inputs():
    x = torch.randn(4, 7)
    t = torch.tensor([0, 6, -100, 3])
    s = torch.tensor(1.0)
    op = r"torch_wsl\.cross_entropy_loss_grad_: expected "
    yield BadInput((x, torch.tensor([0, 9, 1, 2]), s), match=op + r"target values to be class indices in \[0, 7\) "
                   r"or ignore_index \(-100\), got 9 at position 1", name="target-range", data_dependent=True)
    yield BadInput((torch.randn(7, 4).t(), t, s), match=op + r"input to have contiguous, non-overlapping rows \(it "
                   r"is overwritten with the gradient\), got strides \[1, 4\]", name="transposed")
    yield BadInput((x, t, torch.ones(3)), match=op + r"grad_scale to have shape \[\] or \[4\], got shape \[3\]",
                   name="scale-shape")
    yield BadInput((x, t.float(), s), match=op + r"target to hold class indices", name="float-target")


# ---------------------------------------------------------------- linear cross-entropy


def _ref_linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                              label_smoothing=0.0, *, softcap=None, chunk_size=None):
    logits = F.linear(input, weight, bias)
    loss = F.cross_entropy(_softcapped(logits, softcap).reshape(-1, weight.shape[0]), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss


# (input shape, vocab, options): hidden 1, 769, 5125; [batch, seq, hidden] input; chunks that divide the
# tokens and chunks that do not; bias; an empty batch; all ignored; non-contiguous hidden states.
LIN_CASES = [
    ((5, 1), 7, {}),
    ((3, 769), 33, {"chunk_size": 2, "bias": True}),
    ((2, 5125), 17, {"reduction": "sum", "label_smoothing": 0.1}),
    ((2, 3, 16), 29, {"chunk_size": 4, "softcap": 5.0}),
    ((0, 8), 11, {"reduction": "sum"}),
    ((6, 24), 13, {"noncontig": True, "reduction": "none", "bias": True, "chunk_size": 4}),
    ((7, 12), 19, {"all_ignored": True, "reduction": "sum", "bias": True}),
    ((9, 10), 1000, {"chunk_size": 3, "label_smoothing": 0.2, "softcap": 10.0}),
    ((2, 4, 6), 5, {"reduction": "none", "chunk_size": 3}),
]


def _lin_samples(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(2)
    for i, (shape, vocab, opts) in enumerate(LIN_CASES):
        hidden = shape[-1]
        s = 2.0 / math.sqrt(hidden)  # logits of order 1
        x = make(shape, dtype, device, requires_grad=requires_grad, noncontiguous=opts.get("noncontig", False),
                 generator=g)
        w = make((vocab, hidden), dtype, device, requires_grad=requires_grad, low=-s, high=s, generator=g)
        b = make((vocab,), dtype, device, requires_grad=requires_grad, generator=g) if opts.get("bias") else None
        tokens = math.prod(shape[:-1])
        t = _targets(tokens, vocab, g, all_ignored=opts.get("all_ignored", False)).reshape(shape[:-1]).to(device)
        kwargs = {"reduction": opts.get("reduction", "mean"), "label_smoothing": opts.get("label_smoothing", 0.0),
                  "softcap": opts.get("softcap"), "chunk_size": opts.get("chunk_size")}
        name = f"{'x'.join(map(str, shape))}-v{vocab}-" + "-".join(f"{k}={v}" for k, v in opts.items())
        yield Sample((x, w, t, b), kwargs, name=name, opcheck=i in (0, 1, 3, 4, 5, 8))


def _lin_bad_inputs():
    x = torch.randn(4, 8)
    w = torch.randn(5, 8)
    t = torch.tensor([0, 4, -100, 2])
    op = r"torch_wsl\.linear_cross_entropy: expected "
    yield BadInput((x, torch.randn(5, 9), t), match=op + r"weight to have input's hidden size 8 as its last dimension "
                   r"\(\[vocab, hidden\]\), got shape \[5, 9\]", name="hidden-mismatch")
    yield BadInput((x, w, torch.tensor([0, 5, 1, 2])), match=op + r"target values to be class indices in \[0, 5\) or "
                   r"ignore_index \(-100\), got 5 at position 1", name="target-range", data_dependent=True)
    yield BadInput((x, w, t.float()), match=op + r"target to hold class indices as int64 or int32 \(class "
                   r"probabilities are not supported\), got float32", name="float-target")
    yield BadInput((x, w.double(), t), match=op + r"weight to have the dtype of input \(float32\), got float64",
                   name="weight-dtype")
    yield BadInput((x, w, t, torch.randn(4)), match=op + r"bias to have shape \[5\] \(one per row of weight\), got "
                   r"shape \[4\]", name="bias-shape")
    yield BadInput((x, w, torch.tensor([0, 1, 2])), match=op + r"target to have shape \[4\]", name="target-shape")
    yield BadInput((x, w, t), {"chunk_size": 0}, match=op + r"chunk_size >= 1 or None, got 0", name="chunk-size")
    yield BadInput((x, w, t), {"reduction": "avg"}, match=op + r"reduction to be 'none', 'mean' or 'sum', got 'avg'",
                   name="reduction")
    yield BadInput((x.long(), w, t), match=op + r"input to have a floating dtype", name="int-input")


register(
    OpInfo("cross_entropy", cross_entropy, _ref_cross_entropy, _ce_samples, _ce_bad_inputs),
    OpInfo("cross_entropy_loss_grad_", _loss_grad, _ref_loss_grad, _loss_grad_samples, _loss_grad_bad_inputs,
           supports_grad=False),
    OpInfo("linear_cross_entropy", linear_cross_entropy, _ref_linear_cross_entropy, _lin_samples, _lin_bad_inputs),
)
