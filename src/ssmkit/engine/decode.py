"""The fused decode step: one C++ call per generated token for a whole Mamba or Mamba-2 language model.

Reference: Gu & Dao 2023 (arXiv 2312.00752) §3.4 and Alg. 2, one recurrent step of every block
``h ← h + Mamba(RMSNorm(h))`` (residual stream float32), then ``logits = lm_head(RMSNorm_f(h))``. Per layer
the kernel (``csrc/decode.cpp``, ``csrc/decode_kernels.h``) does, for every sequence of the batch:

    xn = RMSNorm(h) ⊙ g,  [x, z] = W_in xn,  u = SiLU(conv step of x),  [δ, B, C] = W_x u,
    Δ = softplus(W_dt δ + b_dt),  s ← exp(Δ A) ⊙ s + Δ u Bᵀ,  y = (s C + D u) ⊙ SiLU(z),  h ← h + W_out y

and per Mamba-2 layer (Dao & Gu 2024, arXiv 2405.21060, §7.1; H heads of headdim p in g groups):

    xn = RMSNorm(h) ⊙ g,  [z₀, x₀, z, xBC, dt] = W_in xn,  [x, B, C] = SiLU(conv step of xBC),
    Δ_h = softplus(dt_h + b_h),  s_h ← exp(Δ_h A_h) s_h + Δ_h x_h B_gᵀ,  y_h = s_h C_g + D x_h,
    y = RMSNorm_group(y ⊙ SiLU(z)) ⊙ w,  h ← h + W_out [SiLU(z₀) ⊙ x₀, y]

in float32, reading weights stored as float32, bfloat16 or int8 (``ssmkit.engine.quant``: per-row
scales) and widening them in registers; every weight is read once per step whatever the batch size.
Matrix-vector products are split over output rows across torch's intra-op threads
(``torch.set_num_threads``). The instruction set (AVX-512, AVX2 + FMA, or the baseline build) is chosen
at run time from what the CPU reports; ``isa=`` forces one.

The slow twin is the module path: ``MambaLM.forward(ids, cache=cache)`` with one token. Differences from
it, on purpose: every intermediate stays float32 (a bfloat16 model's module path rounds each activation
to bfloat16), and the cache's states are updated **in place** — ``conv_state`` and ``ssm_state`` keep their
tensors (a state tensor that is not float32 and contiguous, or requires grad, is first replaced on its
``MambaState`` by a float32 copy, once). Use it without autograd (decoding), which is when
:func:`decode_step` applies.

Weights are packed once per model (float32 and bfloat16 matrices are used where they lie, without a copy;
the small vectors are converted to float32; ``A = −exp(A_log)`` and the transposed ``dt_proj`` are
precomputed). :func:`decode_step` keeps one packed decoder per model and re-packs when a parameter's data,
dtype or version changes (``load_state_dict``, an optimiser step, ``model.to(dtype)``) or the model is
quantized.

Glossary: d_model Dm, d_inner E, d_state N, dt_rank R, d_conv the conv width, b batch, V_pad the padded
vocabulary; ``isa`` the instruction-set variant ("avx512", "avx2", "generic").
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ssmkit import kernels
from ssmkit.engine import quant
from ssmkit.engine.quant import QuantEmbedding, QuantLinear
from ssmkit.layers.mamba import Mamba
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.scan.ssd import DEFAULT_DT_LIMIT

_CSRC = Path(__file__).resolve().parent / "csrc"

DECODE = kernels.Extension(
    name="decode",
    title="fused decode-step kernel",
    sources=(_CSRC / "decode.cpp",),
    headers=(_CSRC / "decode_kernels.h",),
    # No -march: the file compiles its AVX-512 / AVX2 variants under `#pragma GCC target` and picks one at
    # run time, so the baseline variant is portable. FMA contraction is allowed (-ffp-contract=fast).
    cflags=("-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"),
    ldflags=("-fopenmp",),
    expected_build="usually about a minute",
)

ISAS = ("auto", "avx512", "avx2", "generic")
_E_PAD = 16  # the kernel reads Δ's inputs 16 channels at a time (the widest vector)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def extension():
    """The loaded kernel module, or None (then ``kernels.reason(DECODE)`` says why)."""
    return kernels.load(DECODE)


def available_isas() -> list[str]:
    """The instruction-set variants this CPU runs, best first (builds the kernel on first use)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(kernels.reason(DECODE))
    return list(ext.available_isas())


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused step cannot run ``model`` (None when it can): structure, device or dtype."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "lm_head") or not hasattr(backbone, "norm_f"):
        return f"not a Mamba language model ({type(model).__name__})"
    for i, layer in enumerate(backbone.layers):
        if isinstance(getattr(layer, "mixer", None), Mamba2):
            if getattr(layer, "mlp", None) is not None:
                return f"layer {i} has a GatedMLP after its mixer, which the fused step lacks"
            continue
        if not isinstance(getattr(layer, "mixer", None), Mamba):
            return f"layer {i} is not a Mamba (S6) or Mamba-2 mixer"
        if layer.mixer.bcdt_rms_eps is not None:
            return f"layer {i} is a Falcon-Mamba mixer (RMS-normalised Δ, B, C), which the fused step lacks"
        if getattr(layer, "mlp", None) is not None:
            return f"layer {i} has a GatedMLP after its mixer, which the fused step lacks"
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            return f"{name} is on {t.device}, the fused step runs on the CPU"
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.bfloat16):
            return f"{name} has dtype {t.dtype} (the fused step takes float32, bfloat16 or int8 weights)"
    return None


def _f32(t: Tensor | None) -> Tensor:
    """A float32 contiguous copy or view (an empty tensor for None)."""
    if t is None:
        return torch.empty(0)
    return t.detach().to(torch.float32).contiguous()


def _matrix(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight as the kernel reads it, per-row scales or an empty tensor) of a Linear / QuantLinear."""
    if isinstance(layer, (QuantLinear, QuantEmbedding)):
        return layer.qweight.contiguous(), _f32(layer.scale)
    w = layer.weight.detach()  # (o, k)
    if w.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be float32 or bfloat16, got {w.dtype}")
    return w.contiguous(), torch.empty(0)


def _dt_transposed(dt_proj: nn.Module, e_pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """dt_proj's weight transposed and zero-padded, (R, e_pad); its scales and bias padded to (e_pad,)."""
    w, s = _matrix(dt_proj)  # (E, R)
    E, R = w.shape
    wt = w.new_zeros(R, e_pad)  # (R, e_pad)
    wt[:, :E] = w.t()
    st = torch.empty(0)
    if s.numel():
        st = torch.ones(e_pad)  # (e_pad,)
        st[:E] = s
    bias = torch.zeros(e_pad)  # (e_pad,)
    if dt_proj.bias is not None:
        bias[:E] = dt_proj.bias.detach().float()
    return wt, st, bias


def _pack_layer(block: nn.Module) -> list[Tensor]:
    m = block.mixer
    e_pad = math.ceil(m.d_inner / _E_PAD) * _E_PAD
    in_w, in_s = _matrix(m.in_proj)
    x_w, x_s = _matrix(m.x_proj)
    dt_w, dt_s, dt_b = _dt_transposed(m.dt_proj, e_pad)
    out_w, out_s = _matrix(m.out_proj)
    A = (-torch.exp(m.A_log.detach().float())).contiguous()  # (E, N)
    return [
        _f32(block.norm.weight),  # (Dm,)
        in_w,  # (2E, Dm)
        in_s,
        _f32(m.in_proj.bias),
        _f32(m.conv1d.weight[:, 0, :]),  # (E, d_conv)
        _f32(m.conv1d.bias),
        x_w,  # (R + 2N, E)
        x_s,
        dt_w,  # (R, e_pad)
        dt_s,
        dt_b,  # (e_pad,)
        A,
        _f32(m.D),  # (E,)
        out_w,  # (Dm, E)
        out_s,
        _f32(m.out_proj.bias),
    ]


def _pack_mamba2(block: nn.Module) -> tuple[list[Tensor], list[float]]:
    """A Mamba-2 block's tensors and shape parameters in the order ``Decoder`` takes them."""
    m = block.mixer
    in_w, in_s = _matrix(m.in_proj)
    out_w, out_s = _matrix(m.out_proj)
    lo, hi = m.dt_limit
    clamp = (lo, hi) != DEFAULT_DT_LIMIT
    tensors = [
        _f32(block.norm.weight),  # (Dm,)
        in_w,  # (2 d_inner + 2 g N + H, Dm)
        in_s,
        _f32(m.in_proj.bias),
        _f32(m.conv1d.weight[:, 0, :]),  # (conv_dim, d_conv)
        _f32(m.conv1d.bias),
        _f32(m.dt_bias),  # (H,)
        (-torch.exp(m.A_log.detach().float())).contiguous(),  # (H,)
        _f32(m.D).reshape(-1),  # (H,) or (d_ssm,)
        _f32(m.norm.weight) if m.rmsnorm else torch.empty(0),  # (d_ssm,)
        out_w,  # (Dm, d_inner)
        out_s,
        _f32(m.out_proj.bias),
    ]
    eps = m.norm.eps if m.rmsnorm else 0.0
    params = [m.nheads, m.headdim, m.ngroups, m.d_state, m.d_mlp, float(m.norm_before_gate), eps,
              lo if clamp else 0.0, hi if clamp else 0.0, float(clamp)]  # fmt: skip
    return tensors, [float(v) for v in params]


class FusedDecoder:
    """A Mamba language model packed for the fused decode step.

    Args:
        model: a ``MambaLM`` on the CPU with float32 or bfloat16 weights, or int8 weights from
            :func:`ssmkit.engine.quantize` (mixed is fine, e.g. a bfloat16 model quantized).
        isa: "auto" (the best the CPU runs) or one of "avx512", "avx2", "generic".

    The packed weights are a snapshot of the model's parameters at construction (float32 / bfloat16
    matrices by reference); build a new decoder after changing them, or use :func:`decode_step`, which does.
    """

    def __init__(self, model: nn.Module, isa: str = "auto"):
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"the fused decode step cannot run this model: {why}")
        ext = extension()
        if ext is None:
            raise RuntimeError(kernels.reason(DECODE))
        if isa != "auto" and isa not in ext.available_isas():
            raise ValueError(f"isa {isa!r} is not available on this CPU (available: {ext.available_isas()})")
        self.isa = isa
        backbone = model.backbone
        layers, params = [], []
        for block in backbone.layers:
            tensors, p = _pack_mamba2(block) if isinstance(block.mixer, Mamba2) else (_pack_layer(block), [])
            layers.append(tensors)
            params.append(p)
        emb_w, emb_s = _matrix(backbone.embedding)
        head_w, head_s = _matrix(model.lm_head)
        norm_eps = backbone.norm_f.eps
        d_conv = backbone.layers[0].mixer.d_conv if len(backbone.layers) else 1
        self._impl = ext.Decoder(
            layers, params, emb_w, emb_s, _f32(backbone.norm_f.weight), head_w, head_s, norm_eps, d_conv
        )
        self._impl.set_sources(list(model.parameters()) + list(model.buffers()))
        self.n_layer = len(backbone.layers)

    def current(self) -> bool:
        """Whether the packing still matches the model: no parameter or buffer has new data, dtype or
        version since (an in-place update, ``load_state_dict``, ``model.to``). Replaced modules are not
        seen (except by :func:`ssmkit.engine.quantize`, which :func:`decode_step` watches)."""
        return self._impl.current()

    def step(self, input_ids: Tensor, cache) -> Tensor:
        """One token per sequence: ``input_ids`` (b, 1) int64/int32 -> logits (b, 1, V_pad) float32.

        ``cache`` (``model.new_cache(b)`` or one that the module path prefilled) is updated in place
        (see the module docstring) and its ``seqlen_offset`` advanced by one.
        """
        ids = input_ids.reshape(-1)  # (b,)
        if ids.dtype != torch.long:
            ids = ids.long()
        try:
            logits = self._impl.step(ids, cache.layers, self.isa)  # (b, V_pad)
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None
        cache.seqlen_offset += 1
        return logits[:, None]  # (b, 1, V_pad)


# ---- the hook MambaLM.forward calls for one-token steps without autograd ---------------------------------
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (structure count, decoder)


_enabled = [True]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block :func:`decode_step` declines (returns None), so one-token calls take the module
    path — to measure or test the slow twin through ``model(ids, cache=cache)`` itself."""
    before = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = before


def forget(model: nn.Module) -> None:
    """Drop the packed decoder :func:`decode_step` keeps for ``model`` (it re-packs on the next call)."""
    _decoders.pop(model, None)


def decode_step(model: nn.Module, input_ids: Tensor, cache) -> Tensor | None:
    """The fused step for ``model(input_ids, cache=cache)`` with one token, or None where it does not apply.

    Args:
        model: a ``MambaLM``.
        input_ids: (b, 1) token ids (already checked by the caller).
        cache: the model's ``Cache`` for b sequences; updated in place, ``seqlen_offset`` += 1.
    Returns:
        logits (b, 1, V_pad) float32, or None when the fused step cannot run this model (float64 / float16
        weights, not on the CPU, layers other than Mamba, ``SSMKIT_NO_CPU_EXT=1`` or no compiler — the last
        two warned once — or inside :func:`disabled`): the caller then runs the module path.
    """
    if not _enabled[0]:
        return None
    entry = _decoders.get(model)
    if entry is None or entry[0] != quant.structure_changes[0] or not entry[1].current():
        _decoders.pop(model, None)
        if unsupported_reason(model) is not None:  # asked again next time: the model may change
            return None
        if extension() is None:
            kernels.warn_fallback(DECODE, "the module decode path", stacklevel=3)
            return None
        entry = (quant.structure_changes[0], FusedDecoder(model))
        _decoders[model] = entry
    return entry[1].step(input_ids, cache)
