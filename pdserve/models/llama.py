"""One decoder for the Llama family: Llama 2/3 (llama3 RoPE), SmolLM2, Mistral, Qwen2/2.5
(q/k/v bias), Qwen3 (per-head q/k RMSNorm). GQA and tied embeddings throughout.

Token-flat: every tensor is ``[T, ...]`` over the step's ragged tokens (prefill chunks and decode
tokens mixed); the attention backend owns the KV cache and the per-sequence structure.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pdserve.models.arch import ModelArch
from pdserve.models.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                   QuantizableLinear, RMSNorm, RotaryEmbedding, RowParallelLinear, TPInfo,
                                   VocabParallelEmbedding, silu_and_mul)
from pdserve.runtime.attention import AttentionBackend
from pdserve.runtime.forward import ForwardBatch
from pdserve.runtime.parallel import DPInfo

# HF checkpoint name part -> (our fused parameter name part, shard id)
STACKED_PARAMS = (
    (".q_proj.", ".qkv_proj.", 0),
    (".k_proj.", ".qkv_proj.", 1),
    (".v_proj.", ".qkv_proj.", 2),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPInfo, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                          arch.attention_bias, tp, dtype, device)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        heads = self.qkv_proj.heads
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, False, tp, dtype, device,
                                        input_range=(heads.q_start * arch.head_dim, heads.q_count * arch.head_dim))
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        self.scale = arch.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if x.shape[0] == 0:  # a DP attention group with no tokens this step: only the collectives run
            return self.o_proj(qkv.new_zeros((0, self.q_size)))
        return self.o_proj(self.attend(qkv, positions, rope, batch, attn))

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
               batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) * D] -> attention output [T, Hq * D] (K/V stored on the way)."""
        t = qkv.shape[0]
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is None and not qkv.is_cuda:  # q and k side by side: rotate them in one go
            qk = rope.rotate(positions, qkv[:, :self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads,
                                                                                 self.head_dim))
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        else:
            q = qkv[:, :self.q_size].reshape(t, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].reshape(t, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if attn.fuses_rope and rope.cos_sin is not None:  # rotated where K/V are stored
                out = attn.forward(self.layer_idx, q, k, v, batch, self.scale, rope=(positions, rope.cos_sin))
                return out.reshape(t, self.q_size)
            q, k = rope(positions, q, k)
        return attn.forward(self.layer_idx, q, k, v, batch, self.scale).reshape(t, self.q_size)  # [T, Hq * D]


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPInfo, dtype: torch.dtype, device) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [inter, inter], False, tp, dtype, device)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, False, tp, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I / tp], gate and up in blocks
        return self.down_proj(silu_and_mul(gate_up, self.gate_up_proj.block))  # -> [T, I / tp] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPInfo, dtype: torch.dtype, device,
                 attn_tp: TPInfo | None = None, dp: DPInfo | None = None) -> None:
        """``tp`` splits the MLP; ``attn_tp`` (default: ``tp``) the attention; with ``dp`` (DP
        attention) the MLP runs over every group's tokens, gathered before it and returned after."""
        super().__init__()
        self.dp = dp or DPInfo()
        self.self_attn = LlamaAttention(arch, layer_idx, attn_tp or tp, dtype, device)
        self.mlp = LlamaMLP(arch, tp, dtype, device)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)

    def forward(self, x, residual, positions, rope, batch, attn):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rope, batch, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        if self.dp.size == 1:
            return self.mlp(x), residual
        counts = batch.dp_tokens  # tokens of each DP group this step
        return self.dp.own(self.mlp(self.dp.gather(x, counts)), counts), residual

    def forward_gemv(self, residual, positions, rope, batch, attn) -> None:
        """One token through the fused GEMVs (kernels/gemv.py): ``residual [1, H]`` is the
        residual stream in and out, updated in place; four GEMV launches plus attention."""
        from pdserve.kernels.gemv import fused_gemv  # triton stays out of CPU-only imports

        sa, mlp = self.self_attn, self.mlp
        qkv = fused_gemv(residual, sa.qkv_proj.weight, sa.qkv_proj.bias, norm_weight=self.input_layernorm.weight,
                         eps=self.input_layernorm.eps)
        fused_gemv(sa.attend(qkv, positions, rope, batch, attn), sa.o_proj.weight, residual=residual)
        act = fused_gemv(residual, mlp.gate_up_proj.weight, norm_weight=self.post_attention_layernorm.weight,
                         eps=self.post_attention_layernorm.eps, silu_out=True, gate_up_block=mlp.gate_up_proj.block)
        fused_gemv(act, mlp.down_proj.weight, residual=residual)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPInfo, dtype: torch.dtype, device, max_positions: int,
                 attn_tp: TPInfo | None = None, dp: DPInfo | None = None) -> None:
        super().__init__()
        # DP attention: each group embeds its own tokens, so the table is split like attention
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, attn_tp or tp, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, tp, dtype, device, attn_tp, dp)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                          arch.rope_scaling_dict or None, device)
        self.fused_gemv = False  # batch-1 steps through forward_gemv (LlamaForCausalLM.enable_fused_gemv)

    def forward(self, input_ids, positions, batch, attn) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        if self.fused_gemv and input_ids.shape[0] == 1:
            for layer in self.layers:
                layer.forward_gemv(x, positions, self.rotary_emb, batch, attn)  # x: the residual stream
            return self.norm(x)
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary_emb, batch, attn)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tp_rank: int = 0, tp_size: int = 1, tp_group=None, max_positions: int | None = None,
                 attn_tp: TPInfo | None = None, dp: DPInfo | None = None) -> None:
        """``tp_*``: the MLP's tensor parallelism (all of the node's ranks); ``attn_tp``: attention's,
        the embedding's and the LM head's (default: the same); ``dp``: DP attention groups."""
        super().__init__()
        self.arch = arch
        self.tp = TPInfo(tp_rank, tp_size, tp_group)
        self.attn_tp = attn_tp or self.tp
        self.dp = dp or DPInfo()
        max_positions = max(max_positions or 0, arch.max_position_embeddings)
        self.model = LlamaModel(arch, self.tp, dtype, device, max_positions, self.attn_tp, self.dp)
        shared = self.model.embed_tokens.weight if arch.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, self.attn_tp, dtype, device, shared=shared)

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this TP rank stores (num_kv_heads / tp, or 1 when KV heads are replicated)."""
        return self.model.layers[0].self_attn.num_kv_heads

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                attn: AttentionBackend) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, batch, attn)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, dp_rows: list[int] | None = None) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32. DP attention: ``dp_rows`` are each group's N, and
        every rank gets every group's logits rows, in group order."""
        if self.dp.size > 1:
            return self.dp.gather(self.lm_head.logits(hidden).float(), dp_rows)
        if self.model.fused_gemv and hidden.shape[0] == 1:
            from pdserve.kernels.gemv import fused_gemv
            logits = torch.empty(1, self.lm_head.weight.shape[0], dtype=torch.float32, device=hidden.device)
            return fused_gemv(hidden, self.lm_head.weight, out=logits)[:, :self.arch.vocab_size]
        return self.lm_head.logits(hidden).float()

    def enable_fused_gemv(self) -> str | None:
        """Batch-1 steps (a decode step of one sequence) through the fused GEMV kernels from now
        on; returns why not instead where they cannot serve this model (``--disable-fused-gemv``
        turns them off)."""
        if self.tp.size > 1:
            return "tensor parallel (the residual add must follow the all-reduce)"
        if any(isinstance(m, QuantizableLinear) and m.qweight is not None for m in self.modules()):
            return "int8 weights"
        layer = self.model.layers[0]
        if layer.self_attn.o_proj.bias is not None:
            return "an output-projection bias"
        if layer.self_attn.qkv_proj.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"weights in {layer.self_attn.qkv_proj.weight.dtype}"
        self.model.fused_gemv = True
        return None

    def quantize_(self, method: str) -> None:
        """After loading: every linear layer (qkv, o, gate_up, down, lm_head) to int8 (``--quantization``)."""
        for module in self.modules():
            if isinstance(module, QuantizableLinear):
                module.quantize_(method)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; each layer slices its own TP shard. Raises if any is missing."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            target, shard = _target_name(name)
            if target not in params:
                raise ValueError(f"--model-path: checkpoint tensor {name!r} has no place in {self.arch.architecture}")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if shard is not None:
                    loader(param, tensor, shard)
                elif loader is not None:
                    loader(param, tensor)
                else:
                    _plain_copy(param, tensor, name)
            loaded.add(target if shard is None else f"{target}#{shard}")
        _check_complete(self, params, loaded)


def _target_name(name: str) -> tuple[str, int | None]:
    for hf_part, ours, shard in STACKED_PARAMS:
        if hf_part in name:
            return name.replace(hf_part, ours), shard
    return name, None


def _plain_copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    param.data.copy_(tensor)


def _check_complete(model: LlamaForCausalLM, params: dict[str, torch.Tensor], loaded: set[str]) -> None:
    expected: set[str] = set()
    for name in params:
        if name == "lm_head.weight" and model.arch.tie_word_embeddings:
            continue
        if ".qkv_proj." in name:
            expected.update(f"{name}#{i}" for i in range(3))
        elif ".gate_up_proj." in name:
            expected.update(f"{name}#{i}" for i in range(2))
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"--model-path: checkpoint lacks {len(missing)} weight(s): {shown}")
