"""The Mamba-2 mixer: a gated SSD layer, A a scalar per head (Dao & Gu 2024, arXiv 2405.21060, §7.1, Fig. 6).

For an input sequence u (b, l, d_model), with d_ssm = nheads · headdim channels going through the SSM:

    [z, x, B, C, Δ] = in_proj(u)                       one projection, in this order ("parallel" block)
    [x, B, C]       = SiLU(causal_depthwise_conv1d([x, B, C]))      width d_conv, over all three
    y               = ssd(x, Δ, A = −exp(A_log), B, C, D, dt_bias, softplus, dt_limit)   (ssmkit.ssd)
    y               = RMSNorm(y · SiLU(z))             gated RMSNorm per group (``norm_before_gate=False``)
    out             = out_proj(y)

With ``d_ssm < d_inner`` the rest of the inner width is a gated MLP: in_proj also yields [z₀, x₀] in front,
and y = [SiLU(z₀) · x₀, y] goes to out_proj. With ``rmsnorm=False`` the gate z goes to the SSD operator
instead (y · SiLU(z)) and there is no norm.

Parameter names, shapes and initialisation are those of mamba-ssm's ``Mamba2`` (transformers'
``Mamba2Mixer`` uses the same names), so state dicts move between them unchanged: ``in_proj`` (d_model ->
2·d_inner + 2·ngroups·d_state + nheads), ``conv1d`` over x, B, C (conv_dim = d_ssm + 2·ngroups·d_state
channels), ``dt_bias`` (nheads,) = softplus⁻¹ of a log-uniform Δ in [dt_min, dt_max] floored at
dt_init_floor, ``A_log`` (nheads,) = log of A ~ U(A_init_range), ``D`` (nheads,) or (d_ssm,) ones,
``norm.weight`` (d_ssm,) ones, ``out_proj`` (d_inner -> d_model); in_proj, out_proj and conv1d keep
PyTorch's default initialisation (conv1d U(±conv_init) when given). A_log, D and dt_bias carry
"no weight decay" (``_no_weight_decay``, ``_ssm_optim``).

Caching (the one state protocol). ``forward(u, state)`` takes an optional :class:`Mamba2State` —
``conv_state`` (b, conv_dim, d_conv), the last d_conv pre-convolution inputs, oldest first (mamba-ssm's and
transformers' layout), and ``ssm_state`` (b, nheads, headdim, d_state) float32, the SSD state. The new
inputs are appended to the conv history, the SSD starts from ``ssm_state``, and both fields are then
replaced by their values after the last token (never modified in place, so gradients flow through them).
Prefill, chunked prefill and one-token decoding are one code path; a single token with a state goes
through ``ssd_step`` (the same arithmetic without the chunk machinery).

Glossary (code -> paper): d_model D; d_inner = expand · D; d_ssm the SSM width (= d_inner unless an MLP part
is kept); nheads h; headdim p; ngroups g (heads sharing B, C); d_state N; Δ / dt the step size; A_log
log(−A); z the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.mamba import _at_least_f32, check_hidden_states, conv1d_silu, inverse_softplus
from ssmkit.scan.ssd import DEFAULT_DT_LIMIT, ssd, ssd_step


@dataclass
class Mamba2State:
    """The recurrent state of one Mamba-2 mixer for a batch of sequences (constant size in the length).

    Attributes:
        conv_state: (b, conv_dim, d_conv) the last d_conv pre-convolution inputs [x, B, C] (oldest first).
        ssm_state: (b, nheads, headdim, d_state) float32 (float64 for a float64 layer), the SSD state.
    """

    conv_state: Tensor
    ssm_state: Tensor


def gated_rms_norm(
    x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> Tensor:
    """mamba-ssm's gated RMSNorm over groups of ``group_size`` channels of the last dimension.

    norm_before_gate=False: y = RMSNorm(x · SiLU(z)) · weight;  True: y = RMSNorm(x) · weight · SiLU(z).
    Computed in float32 (float64 for float64 x), weight included, then cast to x's dtype.
    x, z (..., d), weight (d,) -> (..., d).
    """
    dtype = x.dtype
    xf = _at_least_f32(x)  # (..., d)
    zf = None if z is None else z.to(xf.dtype)  # (..., d)
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    *lead, d = xf.shape
    xg = xf.reshape(*lead, d // group_size, group_size)  # (..., groups, group_size)
    normed = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).reshape(*lead, d)  # (..., d)
    out = normed * weight.to(xf.dtype)  # (..., d)
    if zf is not None and norm_before_gate:
        out = out * F.silu(zf)
    return out.to(dtype)


class RMSNormGated(nn.Module):
    """mamba-ssm's ``RMSNormGated``: RMSNorm per group of ``group_size`` channels with an optional SiLU gate.

    Args:
        hidden_size: d, the normalised width.  eps: added to the mean square.
        group_size: channels per normalisation group (default d: one group).
        norm_before_gate: gate after (True) or before (False) the normalisation.
    """

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
        norm_before_gate: bool = True, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if group_size <= 0 or hidden_size % group_size != 0:
            raise ValueError(f"group_size must divide hidden_size = {hidden_size}, got {group_size}")
        self.eps, self.group_size, self.norm_before_gate = float(eps), group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))  # (d,)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, " + (
            f"norm_before_gate={self.norm_before_gate}"
        )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Mamba2(nn.Module):
    """The Mamba-2 mixer with mamba-ssm's parameters, shapes and initialisation.

    Args:
        d_model: model width D (input and output size).
        d_state: SSM state size N per head.
        d_conv: width of the causal depthwise convolution.
        conv_init: if given, conv1d.weight ~ U(±conv_init) (else PyTorch's default).
        expand: d_inner = expand · d_model.
        headdim: p, channels per head; nheads = d_ssm / headdim.
        d_ssm: channels through the SSM (default d_inner); the remaining d_inner − d_ssm form a gated MLP.
        ngroups: g, groups of heads sharing B and C (divides nheads).
        A_init_range: A ~ U(A_init_range) per head (A_log = log A, A = −exp(A_log) in use).
        D_has_hdim: D per channel (d_ssm,) instead of per head (nheads,).
        rmsnorm: gated RMSNorm after the SSD (else the gate goes into the SSD operator).
        norm_before_gate: RMSNorm(y)·SiLU(z) (True) or RMSNorm(y·SiLU(z)) (False, mamba-ssm's default).
        dt_min, dt_max, dt_init_floor: range and floor of the log-uniform initial Δ (dt_bias).
        dt_limit: (min, max) clamp of Δ in use (default (0, ∞): none).
        bias: in_proj / out_proj biases.  conv_bias: conv1d bias.
        chunk_size: chunk length of the SSD block decomposition (a speed knob, the result is the same;
            mamba-ssm's 256 suits its GPU kernel; on a CPU ``ssd`` caps it at ``cpu_chunk_size``).
        layer_idx: position in a stack (informational).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = _positive_int("d_model", d_model)
        self.d_state = _positive_int("d_state", d_state)
        self.d_conv = _positive_int("d_conv", d_conv)
        self.headdim = _positive_int("headdim", headdim)
        self.ngroups = _positive_int("ngroups", ngroups)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.expand = expand
        d_inner = expand * d_model
        if d_inner != int(d_inner) or d_inner <= 0:
            raise ValueError(f"expand * d_model must be a positive integer, got {expand} * {d_model}")
        self.d_inner = int(d_inner)
        self.d_ssm = self.d_inner if d_ssm is None else _positive_int("d_ssm", d_ssm)
        if self.d_ssm > self.d_inner:
            raise ValueError(
                f"d_ssm must be <= d_inner = expand * d_model = {self.d_inner}, got {self.d_ssm}"
            )
        if self.d_ssm % self.headdim != 0:
            raise ValueError(f"d_ssm = {self.d_ssm} must be a multiple of headdim = {self.headdim}")
        self.nheads = self.d_ssm // self.headdim
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"ngroups = {self.ngroups} must divide nheads = d_ssm / headdim = {self.nheads}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {tuple(A_init_range)}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        if not self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"dt_limit must have min <= max, got {tuple(dt_limit)}")
        self.conv_init, self.A_init_range, self.D_has_hdim = conv_init, tuple(A_init_range), D_has_hdim
        self.rmsnorm, self.norm_before_gate, self.layer_idx = rmsnorm, norm_before_gate, layer_idx
        self.d_mlp = self.d_inner - self.d_ssm
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim, padding=d_conv - 1,
            bias=conv_bias, **factory,
        )  # fmt: skip
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        with torch.no_grad():
            u01 = torch.rand(self.nheads, device=device, dtype=torch.float32)  # (h,)
            dt = torch.exp(u01 * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)  # (h,) log-uniform Δ
            self.dt_bias = nn.Parameter(inverse_softplus(dt).to(dtype or torch.get_default_dtype()))  # (h,)
            A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)  # (h,)
            self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))  # (h,)
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))  # (h,)
        for p in (self.A_log, self.D, self.dt_bias):  # read by ssmkit.train.optim.param_groups
            p._no_weight_decay = True
            p._ssm_optim = {"weight_decay": 0.0}
        if rmsnorm:
            self.norm = RMSNormGated(
                self.d_ssm, eps=1e-5, group_size=self.d_ssm // self.ngroups,
                norm_before_gate=norm_before_gate, **factory,
            )  # fmt: skip
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory)

    def new_state(self, batch_size: int, device=None, dtype=None) -> Mamba2State:
        """Zero state for ``batch_size`` sequences (conv state in ``dtype`` or conv1d's; ssm state float32,
        float64 for a float64 layer)."""
        _positive_int("batch_size", batch_size)
        w = self.conv1d.weight
        device = w.device if device is None else device
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype or w.dtype)
        ssm_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        ssm = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return Mamba2State(conv_state=conv, ssm_state=ssm)

    def _check(self, hidden_states: Tensor, state: Mamba2State | None) -> None:
        check_hidden_states(hidden_states, self.d_model, self.conv1d.weight.dtype)  # conv1d: never int8
        if state is None:
            return
        if not isinstance(state, Mamba2State):
            raise ValueError(f"state must be a Mamba2State (from new_state), got {type(state).__name__}")
        b = hidden_states.shape[0]
        expected = {
            "conv_state": (b, self.conv_dim, self.d_conv),
            "ssm_state": (b, self.nheads, self.headdim, self.d_state),
        }
        for name, shape in expected.items():
            got = tuple(getattr(state, name).shape)
            if got != shape:
                raise ValueError(f"state.{name} must have shape {shape}, got {got}")

    def forward(self, hidden_states: Tensor, state: Mamba2State | None = None) -> Tensor:
        """Mix a sequence; continue from and update ``state`` when given.

        Args:
            hidden_states: (b, l, d_model), l >= 1.
            state: optional :class:`Mamba2State`; its fields are replaced by the state after the last token.
        Returns:
            (b, l, d_model) in the input dtype.
        """
        self._check(hidden_states, state)
        b, l, _ = hidden_states.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(hidden_states)  # (b, l, d_in_proj)
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, h], dim=-1
        )  # (b, l, ·) views

        conv_state = None if state is None else state.conv_state
        xBC = xBC.transpose(1, 2)  # (b, conv_dim, l) view
        xBC, conv_state = conv1d_silu(self.conv1d, xBC, conv_state)  # (b, conv_dim, l)
        xBC = xBC.transpose(1, 2)  # (b, l, conv_dim) view
        x, B, C = torch.split(xBC, [self.d_ssm, g * n, g * n], dim=-1)  # (b, l, ·) views

        A = -torch.exp(_at_least_f32(self.A_log))  # (h,)
        D = _at_least_f32(self.D)  # (h,) or (d_ssm,)
        D = D.view(h, p) if self.D_has_hdim else D  # (h,) or (h, p)
        gate = None if self.rmsnorm else z.unflatten(-1, (h, p))  # (b, l, h, p)
        dt_bias = _at_least_f32(self.dt_bias)  # (h,)
        if state is not None and l == 1:  # one decode step: the same arithmetic, no chunk machinery
            y, ssm_state = ssd_step(
                state.ssm_state, x[:, 0].unflatten(-1, (h, p)), dt[:, 0], A, B[:, 0].unflatten(-1, (g, n)),
                C[:, 0].unflatten(-1, (g, n)), D=D, z=None if gate is None else gate[:, 0], dt_bias=dt_bias,
                dt_softplus=True, dt_limit=self.dt_limit,
            )  # fmt: skip
            y = y[:, None]  # (b, 1, h, p)
        else:
            result = ssd(
                x.unflatten(-1, (h, p)), dt, A, B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)),
                chunk_size=self.chunk_size, D=D, z=gate, dt_bias=dt_bias, dt_softplus=True,
                dt_limit=self.dt_limit, initial_states=None if state is None else state.ssm_state,
                return_final_states=state is not None,
            )  # fmt: skip
            y, ssm_state = result if state is not None else (result, None)  # (b, l, h, p)
        if state is not None:
            state.conv_state = conv_state  # (b, conv_dim, d_conv)
            state.ssm_state = _at_least_f32(ssm_state)  # (b, h, p, n)
        y = y.reshape(b, l, self.d_ssm)  # (b, l, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)  # (b, l, d_ssm)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)  # (b, l, d_inner)
        return self.out_proj(y)  # (b, l, d_model)
