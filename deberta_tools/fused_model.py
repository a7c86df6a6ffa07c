"""Run any Hugging Face DebertaV2 model (base or with a head, v2 or v3 config) with the fused attention kernel.

`fuse(model)` swaps the backbone's encoder for `FusedEncoder` in place; embeddings, heads and the optional
convolution layer stay Hugging Face's own modules. Per layer the encoder runs:

    qkv   = x . [Wq|Wk|Wv]ᵀ + b          one GEMM instead of three
    ctx   = fused attention               fused_attention.attention: on Hopper the Gluon near attention (the
                                          near tiles with their position terms made in place), else position
                                          tables and gathers, then the flash-style kernel; Kr, Qr precomputed once
                                          per model; never an S x S tensor
    h     = LayerNorm(ctx . Woᵀ + bo + x) GEMM, then one fused add + LayerNorm kernel
    x'    = LayerNorm(act(h . W1ᵀ + b1) . W2ᵀ + b2 + h)
                                          with the exact GELU (DebertaV2's "gelu") on Hopper in fp16 / bf16
                                          and hidden <= 512, act(h . W1ᵀ + b1) is one Triton GEMM with the
                                          GELU in its epilogue (gemm.linear); else cuBLAS, then the activation

`GraphRunner` captures the whole model call in a CUDA graph per input shape, for batch-1 latency. Hidden states of
every layer come back only when `config.output_hidden_states` is set (passing output_hidden_states=True to a call
is not enough: Hugging Face's backbone always asks its encoder for them). The encoder is inference only: the position projections are computed from the weights when `fuse` runs, so weights changed after
that are not seen (call `fuse` again on a fresh model).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from transformers.activations import GELUActivation
from transformers.modeling_outputs import BaseModelOutput

from . import fused_attention as fa, gemm
from .errors import UserError


@triton.jit
def _add_layer_norm_kernel(X, R, W, B, Y, M, N, eps, stride, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows of Y = LayerNorm(X + R) (sum and statistics in float32)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * stride + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, 1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + offs, (xc * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=ok)


# From this many rows on, the add + LayerNorm kernel takes 4 rows per program (4 warps), else one (1 warp per 256
# columns). On an H100 (hidden 384): 16384 rows 13.5 -> 12.0 us a call, 32 x 512 tokens 8,025 -> 8,125 sequences/s;
# at 512 rows one row per program is faster, 2.4 against 2.7 us (results/fused-attention-h100/NOTES.md, v21).
LAYER_NORM_MANY_ROWS = 8192

# The FFN's up projection and exact GELU in one Triton GEMM (gemm.linear) where gemm.usable says it can; off: cuBLAS
# then the activation. On an H200, demo config: 1.207 -> 1.177 ms a forward at 2048 tokens, 0.585 -> 0.572 at 512,
# 3.51 -> 3.47 ms at 32 x 512 (results/fused-attention-h100/NOTES.md, v30).
GELU_EPILOGUE = True


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x + residual) in one kernel (sum and statistics in float32), into `out` (contiguous) if given."""
    width = x.shape[-1]
    x2, r2 = x.reshape(-1, width), residual.reshape(-1, width)
    if not (x2.is_contiguous() and r2.is_contiguous()):
        x2, r2 = x2.contiguous(), r2.contiguous()
    y = torch.empty_like(x2) if out is None else out.view(-1, width)
    block = triton.next_power_of_2(width)
    rows, warps = (4, 4) if x2.shape[0] >= LAYER_NORM_MANY_ROWS else (1, min(8, max(1, block // 256)))
    warps = 1 if fa.INTERPRET else warps
    _add_layer_norm_kernel[(triton.cdiv(x2.shape[0], rows),)](x2, r2, norm.weight, norm.bias, y, x2.shape[0], width,
                                                               norm.eps, width, ROWS=rows, BLOCK=block,
                                                               num_warps=warps)
    return y.view(x.shape)


class _Layer:
    """Weights of one layer in the layout the fused path reads (views of the originals where possible)."""

    def __init__(self, layer, rel_embeddings: torch.Tensor | None, rule: fa.PositionRule | None, terms: list[str]):
        att = layer.attention.self
        self.heads = att.num_attention_heads
        self.head_dim = att.attention_head_size
        self.w_qkv = torch.cat([att.query_proj.weight, att.key_proj.weight, att.value_proj.weight]).detach()
        self.b_qkv = torch.cat([att.query_proj.bias, att.key_proj.bias, att.value_proj.bias]).detach()
        self.factor = fa.softmax_factor(self.head_dim, att.pos_att_type)
        self.out_dense, self.out_norm = layer.attention.output.dense, layer.attention.output.LayerNorm
        self.inter_dense, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        # "gelu" and "gelu_python" are the exact (erf) GELU that gemm.linear's epilogue computes; other activations
        # (gelu_new's tanh form, relu, ...) stay after a cuBLAS GEMM, as does an up projection without a bias.
        self.gelu_epilogue = isinstance(self.act, GELUActivation) and self.inter_dense.bias is not None
        self.ffn_dense, self.ffn_norm = layer.output.dense, layer.output.LayerNorm
        self.positions: fa.Positions | None = None
        if rule is None or not terms:
            return
        rel = rel_embeddings[: 2 * rule.span].unsqueeze(0)
        pos, c2p_term, p2c_term = [], None, None
        with torch.no_grad():
            if "c2p" in terms:
                proj = att.key_proj if att.share_att_key else att.pos_key_proj
                c2p_term = len(pos)
                pos.append(self._heads(proj(rel)))
            if "p2c" in terms:
                proj = att.query_proj if att.share_att_key else att.pos_query_proj
                p2c_term = len(pos)
                pos.append(self._heads(proj(rel)))
        # [terms, H, 2*span, D]
        self.positions = fa.Positions(rule, torch.stack(pos).contiguous(), c2p_term, p2c_term)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x[0].view(x.shape[1], self.heads, self.head_dim).permute(1, 0, 2)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        qkv = torch.nn.functional.linear(x, self.w_qkv, self.b_qkv)
        ctx = fa.attention(qkv, mask, self.heads, self.head_dim, self.positions, self.factor, ranges=ranges)
        h = add_layer_norm(self.out_dense(ctx), x, self.out_norm)
        up = self.inter_dense
        if GELU_EPILOGUE and self.gelu_epilogue and gemm.usable(h, up.weight):
            inter = gemm.linear(h, up.weight, up.bias, gelu=True)
        else:
            inter = self.act(up(h))
        return add_layer_norm(self.ffn_dense(inter), h, self.ffn_norm)


class FusedEncoder(nn.Module):
    """Drop-in for DebertaV2Encoder at inference: same call, same outputs, fused attention inside."""

    def __init__(self, encoder: nn.Module, config):
        super().__init__()
        self.original = encoder  # keeps the parameters registered (state_dict, .to, .half move them)
        self.config = config
        self._prepared_for: tuple | None = None
        self._layers: list[_Layer] = []

    def _prepare(self, device, dtype) -> None:
        """Build the fused weights (again) when the model moved to another device or dtype."""
        key = (device, dtype)
        if self._prepared_for == key:
            return
        enc, config = self.original, self.config
        terms = [t for t in ("c2p", "p2c") if t in (config.pos_att_type or [])] if enc.relative_attention else []
        self.rule = fa.PositionRule.from_config(config) if enc.relative_attention else None
        rel = enc.get_rel_embedding() if enc.relative_attention else None
        self._layers = [_Layer(layer, rel, self.rule, terms) for layer in enc.layer]
        self._prepared_for = key

    def forward(self, hidden_states, attention_mask, output_hidden_states=True, output_attentions=False,
                query_states=None, relative_pos=None, return_dict=True):
        if output_attentions:
            raise UserError("the fused encoder never forms attention probabilities: output_attentions is not "
                            "available (use the original model)")
        if query_states is not None or relative_pos is not None:
            raise UserError("the fused encoder takes neither query_states nor relative_pos")
        if attention_mask.dim() != 2:
            raise UserError(f"the fused encoder takes a [batch, sequence] padding mask, got {attention_mask.dim()} "
                            "dimensions")
        mask = attention_mask.to(torch.int32)
        x = hidden_states
        # Every layer's output is kept only when the config asks for hidden states (Hugging Face's DebertaV2Model
        # always asks its encoder for them): at long sequences they are most of the activation memory.
        keep = bool(getattr(self.config, "output_hidden_states", False))
        states = [x]
        with torch.no_grad():
            self._prepare(hidden_states.device, hidden_states.dtype)
            ranges = fa.valid_ranges(mask)  # each sequence's first and last token, shared by every layer
            for n, layer in enumerate(self._layers):
                x = layer(x, mask, ranges)
                if n == 0 and self.original.conv is not None:
                    x = self.original.conv(hidden_states, x, attention_mask)
                if keep:
                    states.append(x)
        if not keep:
            states = [x]
        if not return_dict:
            return (x, tuple(states) if output_hidden_states else None)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(states))


def backbone(model: nn.Module) -> nn.Module:
    """The DebertaV2Model inside `model` (itself, or the `deberta` of a model with a head)."""
    base = getattr(model, "deberta", model)
    if type(base).__name__ != "DebertaV2Model":
        raise UserError(f"{type(model).__name__} is not a Hugging Face DebertaV2 model (deberta-v2/v3)")
    return base


def fuse(model: nn.Module) -> nn.Module:
    """Switch `model` (in eval mode) to the fused encoder, in place; returns it."""
    base = backbone(model)
    if isinstance(base.encoder, FusedEncoder):
        return model
    if base.z_steps > 1:
        raise UserError("z_steps > 1 is not supported by the fused path")
    if model.training:
        raise UserError("the fused path is for inference: call model.eval() first")
    base.encoder = FusedEncoder(base.encoder, base.config)
    return model


def first_output(out) -> torch.Tensor:
    """logits for models with a head, last_hidden_state for the base model."""
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


_WARMUP_STREAMS: dict = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the warm-up runs before a capture. cuBLAS keeps a workspace (32 MiB on an
    H100) for every stream it has run on, for the life of the process: a new stream per captured shape grew memory
    by that much per shape (measured, results/fused-attention-h100/NOTES.md)."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class GraphRunner:
    """Replays one CUDA graph of the whole model call per (batch, sequence) shape.

    The returned tensor is the graph's own output buffer: the next call with the same shape overwrites it."""

    def __init__(self, model: nn.Module, warmup: int = 2):
        self.model = model
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}

    def _capture(self, input_ids, attention_mask):
        ids, mask = input_ids.clone(), attention_mask.clone()
        stream = _warmup_stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.model(input_ids=ids, attention_mask=mask)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = first_output(self.model(input_ids=ids, attention_mask=mask))
        return graph, ids, mask, out

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key = (tuple(input_ids.shape), input_ids.dtype, attention_mask.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(input_ids, attention_mask)
        graph, ids, mask, out = self.graphs[key]
        ids.copy_(input_ids)
        mask.copy_(attention_mask)
        graph.replay()
        return out
