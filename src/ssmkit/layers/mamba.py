"""The Mamba mixer: a gated, selective state space layer (Gu & Dao 2023, arXiv 2312.00752, §3.4, Fig. 3).

For an input sequence u (b, l, d_model):

    x, z   = in_proj(u)                              two (b, d_inner, l) branches
    x      = SiLU(causal_depthwise_conv1d(x))        kernel width d_conv, left context only
    δ,B,C  = x_proj(x)                               (b, l, R), (b, l, N), (b, l, N)
    Δ      = softplus(dt_proj.weight δ + dt_proj.bias)
    y      = selective_scan(x, Δ, A = -exp(A_log), B, C, D, z)     (ssmkit.selective_scan, with SiLU(z) gate)
    out    = out_proj(y)

The parameter names, shapes and initialisation are those of ``mamba_ssm.modules.mamba_simple.Mamba``,
so state dicts move between the two unchanged:
``dt_proj.bias`` = softplus⁻¹ of a log-uniform Δ in [dt_min, dt_max] (floored at dt_init_floor) and
marked ``_no_reinit``; ``dt_proj.weight`` ~ U(±dt_rank^-½·dt_scale) (or that constant); ``A_log`` =
log(1..N) per channel (S4D-Real); ``D`` = 1; every other weight keeps PyTorch's default. The model-level
re-initialisation (zero Linear biases, out_proj / √n_layer) is done by ``ssmkit.models.mamba_lm``.

Caching. ``forward(u, state)`` takes an optional :class:`MambaState` — ``conv_state`` (b, d_inner,
d_conv), the last d_conv pre-convolution inputs (mamba-ssm's and transformers' layout), and
``ssm_state`` (b, d_inner, N) float32, the scan state h. The new inputs are appended to the conv state's
history, the causal convolution runs over that, and the scan starts from ``ssm_state``; both states are
then replaced by their values after the last new token. Prefill, chunked prefill and one-token decoding
are therefore the same code path; without a state the history is zeros and h_0 = 0. States are replaced,
never modified in place, so gradients flow through them (truncated BPTT, state passing).

Falcon-Mamba (TII 2024, transformers' ``FalconMambaMixer``) is this mixer with one change: δ, B and C are
each divided by their root mean square over their features (no learned weight, ε = ``bcdt_rms_eps``)
right after x_proj; the state dict is unchanged.

Glossary (code -> paper): d_model D; d_inner E·D; d_state N; dt_rank R; d_conv the conv width;
delta / dt Δ; A_log log(−A); B, C the input-dependent B, C; z the gate branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmkit.layers.conv import causal_conv1d_silu
from ssmkit.scan import selective_scan


@dataclass
class MambaState:
    """The recurrent state of one Mamba mixer for a batch of sequences (constant size in the length).

    Attributes:
        conv_state: (b, d_inner, d_conv) the last d_conv pre-convolution inputs (oldest first).
        ssm_state: (b, d_inner, d_state) float32, the scan state h after the last consumed token.
    """

    conv_state: Tensor
    ssm_state: Tensor


def inverse_softplus(y: Tensor) -> Tensor:
    """softplus⁻¹(y) = log(exp(y) − 1), computed stably as y + log(−expm1(−y)) (pytorch issue #72759)."""
    return y + torch.log(-torch.expm1(-y))


def _at_least_f32(t: Tensor) -> Tensor:
    """float32, unless the tensor is float64 (kept, so float64 models compute exactly in float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _wx(weight: Tensor, x: Tensor) -> Tensor:
    """weight @ x[i] for every batch row i: (o, k), (b, k, l) -> (b, o, l) contiguous.

    One batched GEMM with the weight broadcast over the batch: BLAS reads a transposed ``x`` (a
    ``(b, l, k)`` tensor's ``.transpose(1, 2)``) in place. ``torch.matmul`` would instead fold the batch
    into the rows and copy a transposed operand or result, a (b, ·, l) copy per call forward and backward.
    """
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def init_selective_ssm(
    module: nn.Module,
    d_inner: int,
    d_state: int,
    dt_rank: int,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    dt_init: str = "random",
    dt_scale: float = 1.0,
    dt_init_floor: float = 1e-4,
    factory: dict | None = None,
) -> None:
    """Create the selective SSM's parameters on ``module`` with mamba-ssm's names and initialisation.

    ``x_proj`` (d_inner -> R + 2N, no bias), ``dt_proj`` (R -> d_inner): weight ~ U(±std) (or = std),
    std = R^-½ · dt_scale, bias = softplus⁻¹(Δ) for Δ log-uniform in [dt_min, dt_max] floored at
    dt_init_floor (marked ``_no_reinit``); ``A_log`` = log(1..N) per channel (S4D-Real: A = −(1..N)),
    float32; ``D`` = 1, float32. A_log, D and dt_proj.bias carry "no weight decay" (``_ssm_optim``).
    Used by :class:`Mamba` and by the ablation's bare S6 layer, so both are the same S6.
    """
    factory = factory or {}
    device = factory.get("device")
    module.dt_rank, module.d_state = dt_rank, d_state
    module.bcdt_rms_eps = None  # Mamba; Falcon-Mamba sets the ε of its δ/B/C norms (see Mamba)
    module.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **factory)
    module.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
    dt_init_std = dt_rank**-0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            module.dt_proj.weight.fill_(dt_init_std)
        else:
            module.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
        u01 = torch.rand(d_inner, device=device, dtype=torch.float32)  # (d_inner,)
        dt = torch.exp(u01 * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)  # (d_inner,)
        module.dt_proj.bias.copy_(inverse_softplus(dt))
    module.dt_proj.bias._no_reinit = True  # the model-level init must not zero this bias
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)  # (d_inner, N)
    module.A_log = nn.Parameter(torch.log(A))  # (d_inner, N)
    module.A_log._no_weight_decay = True
    module.D = nn.Parameter(torch.ones(d_inner, device=device, dtype=torch.float32))  # (d_inner,)
    module.D._no_weight_decay = True
    for p in (module.A_log, module.D, module.dt_proj.bias):  # read by ssmkit.train.optim.param_groups
        p._ssm_optim = {"weight_decay": 0.0}


def _rms(t: Tensor, eps: float) -> Tensor:
    """t / sqrt(mean(t², features) + ε) over dim 1 of a (b, features, l) tensor, computed in float32."""
    tf = _at_least_f32(t)
    return (tf * torch.rsqrt(tf.pow(2).mean(1, keepdim=True) + eps)).to(t.dtype)


def selective_ssm(
    module: nn.Module, x: Tensor, z: Tensor | None, ssm_state: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The selective SSM of ``module`` (parameters from :func:`init_selective_ssm`) on x (b, d_inner, l).

    (δ, B, C) = x_proj(x), Δ = softplus(dt_proj.weight δ + dt_proj.bias), then
    ``selective_scan(x, Δ, A = −exp(A_log), B, C, D, z)`` from ``ssm_state`` (b, d_inner, N) or zeros.
    Everything stays in the (b, channels, l) layout: weight @ x per batch row is one batched matmul that
    reads and writes it directly, so no (b, d_inner, l) transpose copies, forward or backward.

    Returns:
        y (b, d_inner, l) and, when ``ssm_state`` was given, the state after the last token (float32, or
        float64 for a float64 layer), else None.
    """
    x_dbl = _wx(module.x_proj.weight, x)  # (b, R + 2N, l)
    if module.x_proj.bias is not None:
        x_dbl = x_dbl + module.x_proj.bias[:, None]
    dt, B, C = torch.split(x_dbl, [module.dt_rank, module.d_state, module.d_state], dim=1)  # (b, ·, l) views
    eps = module.bcdt_rms_eps
    if eps is not None:  # Falcon-Mamba: weightless RMSNorm of δ, B and C over their features, in float32
        dt, B, C = (_rms(t, eps) for t in (dt, B, C))  # (b, ·, l)
    dt = _wx(module.dt_proj.weight, dt)  # (b, d_inner, l); bias added in the scan
    A = -torch.exp(_at_least_f32(module.A_log))  # (d_inner, N)
    result = selective_scan(
        x,
        dt,
        A,
        B,
        C,
        D=_at_least_f32(module.D),
        z=z,
        delta_bias=_at_least_f32(module.dt_proj.bias),
        delta_softplus=True,
        return_last_state=ssm_state is not None,
        initial_state=ssm_state,
    )
    if ssm_state is None:
        return result, None  # (b, d_inner, l)
    y, last = result  # (b, d_inner, l), (b, d_inner, N)
    return y, _at_least_f32(last)


def conv1d_silu(conv1d: nn.Conv1d, x: Tensor, conv_state: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """SiLU(causal depthwise conv1d(x)) over [history, new inputs] (the Mamba mixer's conv, fused).

    The history is the last w − 1 inputs (zeros for a fresh sequence), so exactly l outputs come out with
    no padding. ``conv_state`` (b, d, w) holds the last w pre-convolution inputs, oldest first (mamba-ssm's
    and transformers' layout); x (b, d, l). Returns y (b, d, l) and the conv state after the last input
    (None without a state).
    """
    w = conv1d.weight[:, 0].to(x.dtype)  # (d, w)
    bias = None if conv1d.bias is None else conv1d.bias.to(x.dtype)  # (d,)
    if conv_state is None:
        return causal_conv1d_silu(x, w, bias, None), None
    width = w.shape[-1]
    hist = conv_state.to(x.dtype)  # (b, d, w)
    tail = torch.cat([hist, x[:, :, -width:]], dim=-1)[:, :, -width:]  # (b, d, w)
    y = causal_conv1d_silu(x, w, bias, hist[:, :, 1:])  # (b, d, l)
    return y, tail.to(conv_state.dtype)


def check_hidden_states(hidden_states: Tensor, d_model: int, weight_dtype: torch.dtype) -> None:
    """ValueError unless a mixer's input is (b, l >= 1, d_model) in its weights' dtype (or autocast)."""
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != d_model or hidden_states.shape[1] == 0:
        raise ValueError(
            f"hidden_states must have shape (b, l >= 1, d_model={d_model}), got {tuple(hidden_states.shape)}"
        )
    if hidden_states.dtype != weight_dtype and not torch.is_autocast_enabled(hidden_states.device.type):
        raise ValueError(
            f"hidden_states has dtype {hidden_states.dtype} but the layer's weights are {weight_dtype}; "
            f"convert one to the other (e.g. layer.to({hidden_states.dtype}))"
        )


class Mamba(nn.Module):
    """The Mamba (S6) mixer with mamba-ssm's parameters and initialisation.

    Args:
        d_model: model width D (input and output size).
        d_state: SSM state size N per channel.
        d_conv: width of the causal depthwise convolution.
        expand: d_inner = int(expand · d_model).
        dt_rank: rank R of the Δ projection; "auto" means ceil(d_model / 16).
        dt_min, dt_max: range of the log-uniform initial Δ.
        dt_init: "random" (dt_proj.weight ~ U(±std)) or "constant" (= std), std = R^-½ · dt_scale.
        dt_scale: scale of that std.
        dt_init_floor: lower clamp of the initial Δ.
        conv_bias: whether conv1d has a bias.
        bias: whether in_proj and out_proj have biases.
        bcdt_rms_eps: None (Mamba), or ε of the weightless RMSNorm applied to δ, B and C after x_proj
            (Falcon-Mamba, transformers' ``FalconMambaMixer``, ``mixer_rms_eps``).
        layer_idx: position of the layer in a stack (informational; the model keys caches by index).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        bcdt_rms_eps: float | None = None,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(d_state, int) or d_state <= 0:
            raise ValueError(f"d_state must be a positive int, got {d_state!r}")
        if not isinstance(d_conv, int) or d_conv <= 0:
            raise ValueError(f"d_conv must be a positive int, got {d_conv!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        if self.d_inner <= 0:
            raise ValueError(f"expand * d_model must be >= 1, got expand={expand}, d_model={d_model}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank <= 0:
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.dt_rank = dt_rank
        if bcdt_rms_eps is not None and not bcdt_rms_eps > 0:
            raise ValueError(f"bcdt_rms_eps must be None or > 0, got {bcdt_rms_eps!r}")
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
        init_selective_ssm(
            self, self.d_inner, d_state, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, factory
        )
        self.bcdt_rms_eps = bcdt_rms_eps  # None: Mamba; a float: Falcon-Mamba
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def new_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``batch_size`` sequences (conv state in ``dtype`` or conv1d's; ssm state fp32)."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        w = self.conv1d.weight
        device = w.device if device is None else device
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype or w.dtype)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return MambaState(conv_state=conv, ssm_state=ssm)

    def _check_state(self, state: MambaState, b: int) -> None:
        if not isinstance(state, MambaState):
            raise ValueError(f"state must be a MambaState (from new_state), got {type(state).__name__}")
        expected = {
            "conv_state": (b, self.d_inner, self.d_conv),
            "ssm_state": (b, self.d_inner, self.d_state),
        }
        for name, shape in expected.items():
            got = tuple(getattr(state, name).shape)
            if got != shape:
                raise ValueError(f"state.{name} must have shape (b, d_inner, ·) = {shape}, got {got}")

    def forward(self, hidden_states: Tensor, state: MambaState | None = None) -> Tensor:
        """Mix a sequence; continue from and update ``state`` when given.

        Args:
            hidden_states: (b, l, d_model), l >= 1.
            state: optional :class:`MambaState` for this layer; replaced by the state after the last token.
        Returns:
            (b, l, d_model) in the input dtype.
        """
        check_hidden_states(hidden_states, self.d_model, self.conv1d.weight.dtype)  # conv1d: never int8
        if state is not None:
            self._check_state(state, hidden_states.shape[0])

        # in_proj computed directly in the (b, 2·d_inner, l) layout the conv and the scan read, so x, z and
        # Δ below are contiguous (no transposes/copies; mamba-ssm does the same).
        xz = _wx(self.in_proj.weight, hidden_states.transpose(1, 2))  # (b, 2·d_inner, l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]  # (b, 2·d_inner, l)
        x, z = xz.chunk(2, dim=1)  # (b, d_inner, l) each

        conv_state = None if state is None else state.conv_state
        x, conv_state = conv1d_silu(self.conv1d, x, conv_state)  # (b, d_inner, l)
        if state is not None:
            state.conv_state = conv_state  # (b, d_inner, d_conv)
        y, last = selective_ssm(self, x, z, None if state is None else state.ssm_state)  # (b, d_inner, l)
        if state is not None:
            state.ssm_state = last  # (b, d_inner, N)
        out = _wx(self.out_proj.weight, y)  # (b, d_model, l)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias[:, None]
        return out.transpose(1, 2)  # (b, l, d_model), a view: the residual add reads it in place
