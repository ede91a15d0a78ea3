"""Incremental decoding with a preallocated KV cache: our own forward for GPT-2 and Llama, Hugging Face's elsewhere.

    >>> dec = decoder(model, batch_size=64, max_len=P + T)       # fast when the model family is known
    >>> logits = dec.prefill(context_ids, context_mask)          # [B, V]: next-token logits after the contexts
    >>> logits = dec.step(tokens)                                # [B, V] after appending tokens [B]

The fast path (``GPT2LMHeadModel``, ``LlamaForCausalLM``) reads the Hugging Face module's own weights (no copies:
an optimizer step is seen at once) and runs each layer as a few functional ops: QKV fused where the checkpoint
stores it fused (GPT-2's ``c_attn``), attention over the filled prefix of a cache allocated once for ``max_len``
positions, the output layer on the last position only. It computes the model's own function (the same ops in the
same order where the model defines them; equal to its forward to float rounding), in the model's train/eval
mode: a model in train mode with dropout on, another family, forward hooks, sharded (DTensor), quantized or
meta weights take the generic path (the model's forward with Hugging Face's dynamic cache).

On a GPU the cache is ``[layers, B, max_len, 2, kv_heads, head_dim]`` (a slot's keys and values side by side) and
attention is ``scaled_dot_product_attention``; ``static=True`` gives every step fixed shapes and no host-side state
that changes per token (attention over the whole cache under an additive mask, writes at a device-side slot index),
and ``cuda_graph=True`` replays every step after the first from one captured CUDA graph. A step there is bound by
its kernel count, so each residual add, the norm after it and its cast are one Triton kernel
(:data:`FUSED_NORMS`, :mod:`fdpg.kernels.norms`). On the CPU (by default) the cache is a feature-major "slab" (see
:class:`_FastDecoder`) that the QKV projection writes in place and single-query attention reads with two broadcast
products, several times cheaper than SDPA's per-(row, head) loop at decoding sizes.

The same per-family code gives the scoring pass (:func:`hidden_states`: every position, with autograd, no host
sync) and, on the CPU slab path, a *replay*: ``decoder(..., record=True)`` keeps every GEMM's output of the sampling
pass, and :meth:`_FastDecoder.replay_logits` rebuilds the policy's scoring pass from them with autograd (only the
cheap ops recomputed), so that an on-policy step runs no second forward pass of the policy.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import cpu_decode
from .cpu_gemm import linear, linear_grads

__all__ = ["decoder", "fast_path_reason", "Decoder", "hidden_states"]

_BMM_MAX_LEN = 512          # CPU attention by batched GEMMs up to this many positions (the scores are [B, H, s, s])
RECORD_MAX_BYTES = 2 << 30  # record a sampling pass for its replay only when that takes at most this much memory
#: Where decoding steps fuse each residual add with the norm after it and its cast (kernels/norms.py, Triton):
#: "cuda" (CUDA devices, the default), "always" (CPU tensors too: the tests, under TRITON_INTERPRET=1) or "off";
#: the environment variable FDPG_FUSED_NORMS sets it at import (benchmarks compare with and without).
FUSED_NORMS = os.environ.get("FDPG_FUSED_NORMS", "cuda")


def use_triton(setting: str, name: str, device: torch.device) -> bool:
    """Whether a fused Triton path set to ``setting`` ("cuda": on CUDA devices; "always": CPU tensors too, under
    TRITON_INTERPRET=1; "off") runs on ``device`` (and triton is installed). ``name``: the setting's name (the
    module attribute, and its environment variable), for the error."""
    if setting not in ("cuda", "always", "off"):
        raise ValueError(f"{name}: expected 'cuda', 'always' or 'off', got {setting!r}")
    if setting == "off" or (setting == "cuda" and device.type != "cuda"):
        return False
    import importlib.util

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"{name} = 'always': Triton runs on {device.type} tensors only under TRITON_INTERPRET=1")
    return importlib.util.find_spec("triton") is not None


def _fused_norms(device: torch.device, layout_ok: bool) -> bool:
    """Whether decoding steps on ``device`` take :func:`fdpg.kernels.norms.add_norm` (see :data:`FUSED_NORMS`;
    ``layout_ok``: the cache layout has steps that can, i.e. not the CPU slab)."""
    return use_triton(FUSED_NORMS, "fdpg.decode.FUSED_NORMS (or FDPG_FUSED_NORMS)", device) and layout_ok


def _exact(module, *names) -> bool:
    return type(module).__name__ in names


def _plain(t) -> bool:
    """A dense tensor on its own (not a DTensor, quantized or meta tensor)."""
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"
                         and t.layout == torch.strided)


def _dropout_active(model) -> bool:
    if not model.training:
        return False
    cfg = model.config
    if any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "attn_pdrop", "resid_pdrop",
                                                              "embd_pdrop", "hidden_dropout")):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def fast_path_reason(model) -> str | None:
    """Why ``model`` cannot take the fast path (a short reason), or None when it can."""
    name = type(model).__name__
    if name not in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        return f"{name} is not a model family with a fast decoder (GPT2LMHeadModel, LlamaForCausalLM)"
    if _dropout_active(model):
        return "the model is in train mode with dropout on"
    devices, dtypes = set(), set()
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return f"{type(m).__name__} has forward hooks"
        for t in list(m._parameters.values()):
            if not _plain(t):
                return f"{type(m).__name__} holds a {type(t).__name__} that is not a plain dense tensor"
            if t is not None:
                devices.add(t.device)
                dtypes.add(t.dtype)
    if len(devices) != 1:
        return f"the weights are on {len(devices)} devices"
    if len(dtypes) != 1:
        return "the weights have mixed dtypes"
    cfg = model.config
    if name == "GPT2LMHeadModel":
        if getattr(cfg, "add_cross_attention", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            return "GPT-2 with cross-attention or reorder_and_upcast_attn"
        want = {"ln_1": "LayerNorm", "ln_2": "LayerNorm", "attn.c_attn": "Conv1D", "attn.c_proj": "Conv1D",
                "mlp.c_fc": "Conv1D", "mlp.c_proj": "Conv1D"}
        blocks, extra = model.transformer.h, (model.transformer.ln_f, "LayerNorm")
    else:
        rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", "linear", "llama3", "yarn"):
            return f"Llama with {rope_type!r} RoPE (position-dependent frequencies)"
        if int(getattr(cfg, "pretraining_tp", 1) or 1) != 1:
            return "Llama with pretraining_tp > 1"
        want = {"input_layernorm": "LlamaRMSNorm", "post_attention_layernorm": "LlamaRMSNorm",
                "self_attn.q_proj": "Linear", "self_attn.k_proj": "Linear", "self_attn.v_proj": "Linear",
                "self_attn.o_proj": "Linear", "mlp.gate_proj": "Linear", "mlp.up_proj": "Linear",
                "mlp.down_proj": "Linear"}
        blocks, extra = model.model.layers, (model.model.norm, "LlamaRMSNorm")
        if len(blocks) != cfg.num_hidden_layers:
            return "Llama with a truncated layer list"
    for blk in blocks:
        for path, cls in want.items():
            m = blk.get_submodule(path)
            if not _exact(m, cls):
                return f"{path} is a {type(m).__name__}, expected {cls}"
    if not _exact(extra[0], extra[1]):
        return f"the final norm is a {type(extra[0]).__name__}"
    head = model.get_output_embeddings()
    if not _exact(head, "Linear"):
        return f"the output layer is a {type(head).__name__}, expected Linear"
    return None


class Decoder:
    """Next-token logits ``[B, V]`` for a batch of sequences grown one token at a time.

    ``prefill(context_ids [B, P] long, context_mask [B, P] bool or None)`` runs the left-padded contexts;
    ``step(tokens [B] long)`` appends one token to every sequence. Positions count real tokens only (padding
    takes position 0 and is never attended to), as in :func:`fdpg.models.model_inputs`. ``fast`` says which path.
    Both run without autograd (the logits carry no grad).
    """

    fast = False
    recording = can_replay = False      # see _FastDecoder.replay_logits

    def seal(self) -> None:
        """The sampling pass is over (see :meth:`_FastDecoder.seal`)."""

    def prefill(self, context_ids: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _HFDecoder(Decoder):
    """The generic path: the model's own forward with its dynamic cache."""

    def __init__(self, model):
        self.model, self.cache, self.attn, self.pos = model, None, None, None

    @torch.no_grad()
    def prefill(self, context_ids, context_mask):
        self.attn = None if context_mask is None else context_mask.long()
        pos = None if context_mask is None else (self.attn.cumsum(1) - 1).clamp_min(0)
        self.pos = None if pos is None else pos[:, -1:] + 1
        return self._run(context_ids, pos)

    @torch.no_grad()
    def step(self, tokens):
        ids = tokens[:, None]
        pos = self.pos
        if self.attn is not None:
            self.attn = torch.cat([self.attn, torch.ones_like(ids)], 1)
            self.pos = self.pos + 1
        return self._run(ids, pos)

    def _run(self, ids, pos):
        out = self.model(input_ids=ids, past_key_values=self.cache, attention_mask=self.attn, position_ids=pos,
                         use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]


class _FastDecoder(Decoder):
    """Shared machinery of the fast path: cache, positions, masks, attention; families supply the projections.

    Two cache layouts (``S`` = max_len, ``D``/``Dkv`` = query/key width):

    - "sdpa" (GPUs, and ``static``): ``k, v [layers, B, S, kv_heads, head_dim]``, views of one
      ``[layers, B, S, 2, kv_heads, head_dim]`` tensor (a token's keys one contiguous row, its values the next:
      the k and v of a fused QKV GEMM are written in one copy), read by ``scaled_dot_product_attention``.
    - "slab" (the CPU): ``[layers, S, D + 2 Dkv, B]``, one slot per position holding that token's q, k and v
      transposed (feature-major, batch innermost). The QKV projection writes a slot in place (``out=`` of one
      GEMM, no copy), and single-query attention is two broadcast products that broadcast over the outermost
      dimension and reduce over a middle one with the batch innermost (the fast cases of PyTorch's CPU kernels;
      SDPA's per-(row, head) overhead dominates at decoding sizes there). The attention output comes back
      transposed and enters the output projection as a transposed operand of its GEMM (no copy).
    """

    fast = True

    def __init__(self, model, batch_size: int, max_len: int, *, static: bool = False, attention: str = "auto",
                 record: bool = False, cuda_graph: bool = False):
        if cuda_graph and not static:
            raise ValueError("cuda_graph: replaying a step from a CUDA graph needs static=True (fixed shapes)")
        if attention not in ("auto", "sdpa", "broadcast"):
            raise ValueError(f"attention: expected 'auto', 'sdpa' or 'broadcast', got {attention!r}")
        if static and attention == "broadcast":
            raise ValueError("attention: 'broadcast' attends to the filled prefix; static=True needs 'sdpa'")
        self.model, self.B, self.S, self.static, self.attention = model, batch_size, max_len, static, attention
        w = model.get_output_embeddings()
        self.head_w, self.head_b = w.weight, w.bias
        self.dev, self.wdtype = w.weight.device, w.weight.dtype
        # the slab: asked for, or on the CPU in float32/64 (in bf16/fp16 its products would round before the sums)
        self.want_slab = attention == "broadcast" or (attention == "auto" and self.dev.type == "cpu" and not static
                                                      and self.wdtype in (torch.float32, torch.float64))
        self.slab = False           # decided at prefill (not under autocast: out= GEMMs keep the weights' dtype)
        self.k = self.v = self.kv = None
        self.n = 0                  # filled positions
        self.valid = None           # [B, S] bool: which slots hold real tokens (None: all of them)
        self._sbias = None          # the steps' additive attention mask (see _step_bias)
        self.pos = None             # [B, S] long: the position of every slot of every row
        self._bias_cache = None     # the additive attention mask of the pass over every position
        self.record = record        # keep every GEMM's output for replay_logits (the slab path of families that can)
        self.cuda_graph = cuda_graph and self.dev.type == "cuda"
        self._graph = None          # the captured step, its input and output buffers
        self.recording = False      # decided at prefill
        self.cast = False           # the GEMM weights are copies (cast_gemm_weights): nothing to replay through
        self.fuse_norms = False     # steps add, norm and cast in one kernel (decided at prefill: _fused_norms)
        self.fused = None           # [layer][group]: the stacked weights of cast_gemm_weights' _FUSED groups

    # ---- weights -----------------------------------------------------------------------------------------------

    _GEMMS: tuple = ()          # positions of the GEMM modules (Linear / Conv1D) in each of self.blocks' tuples
    _FUSED: tuple = ()          # groups of those positions: Linears of one input, cast into one stacked weight

    def cast_gemm_weights(self, dtype: torch.dtype) -> None:
        """Decode with copies of the GEMM weights (and biases, and the output layer's) in ``dtype``, made once for
        the pass: under autocast, a step would otherwise cast every float32 weight to ``dtype`` again (reading
        4 + 2 bytes a parameter more than the GEMM's 2, and a kernel per weight; autocast's cache cannot serve a
        CUDA graph). Autocast's own rounding, so the pass computes what it would have. Norms and embeddings stay
        as they are (autocast keeps them in float32). The Linears of each :data:`_FUSED` group (Llama's q, k, v
        and gate, up) are cast into one stacked ``[sum of outs, in]`` weight (``self.fused[layer][group]``; the
        members are views of it): one GEMM, and one cast of its input, in place of two or three."""
        if self.wdtype == dtype or not self._GEMMS:
            return

        def cast(m):
            return SimpleNamespace(weight=m.weight.detach().to(dtype),
                                   bias=None if m.bias is None else m.bias.detach().to(dtype))
        blocks, fused = [], []
        for b in self.blocks:
            b, groups = list(b), []
            for group in self._FUSED:
                w, bias = _stack([b[j] for j in group], dtype)
                groups.append(SimpleNamespace(weight=w, bias=bias))
                at = 0
                for j in group:
                    n = b[j].weight.shape[0]
                    b[j] = SimpleNamespace(weight=w[at:at + n], bias=None if bias is None else bias[at:at + n])
                    at += n
            grouped = {j for g in self._FUSED for j in g}
            blocks.append(tuple(cast(m) if j in self._GEMMS and j not in grouped else m for j, m in enumerate(b)))
            fused.append(groups)
        self.blocks, self.fused = blocks, fused if self._FUSED else None
        self.head_w = self.head_w.detach().to(dtype)
        self.head_b = None if self.head_b is None else self.head_b.detach().to(dtype)
        self.cast = True
        self._blocks_changed()

    def _blocks_changed(self) -> None:
        """Refresh what a family derives from self.blocks."""

    # ---- cache and attention ----------------------------------------------------------------------------------

    def _store(self, i: int, q, k, v):
        """Write the prefill's ``k, v [B, P, Hkv, hd]`` (and, recording, ``q [B, P, H, hd]``) at slots
        ``0..P-1`` of layer ``i``."""
        B, P, Hkv, hd = k.shape
        if self.slab:
            if self.kv is None:
                self._alloc_slab()
            self._k5[i][:P, :, 0].copy_(k.permute(1, 2, 3, 0))
            self._v5[i][:P, :, 0].copy_(v.permute(1, 2, 3, 0))
            if self.recording:
                self._slots[i][:P, :self.D].copy_(q.reshape(B, P, self.D).permute(1, 2, 0))
            return
        if self.k is None:  # the dtype of k: the weights', or autocast's
            new = torch.zeros if self.static else torch.empty   # static attention reads (masked) unfilled slots
            # one tensor, a slot's keys and values side by side: a step writes both in one copy (k and v of a fused
            # QKV GEMM are adjacent); k and v are views
            self.kvc = new(self.n_layer, B, self.S, 2, Hkv, hd, dtype=k.dtype, device=self.dev)
            self.k, self.v = self.kvc[:, :, :, 0], self.kvc[:, :, :, 1]
        kv = _kv_pair(k, v)
        if kv is not None:
            self.kvc[i, :, :P] = kv
        else:
            self.k[i, :, :P] = k
            self.v[i, :, :P] = v

    def _alloc_slab(self):
        L, S, B, D, Dkv, Hkv, hd = self.n_layer, self.S, self.B, self.D, self.Dkv, self.n_kv, self.hd
        G = self.n_head // Hkv
        self.kv = torch.empty(L, S, D + 2 * Dkv, B, dtype=self.wdtype, device=self.dev)
        # per-layer views (made once: a decoding step is a few hundred small ops, each view call counts)
        self._slots = [self.kv[i] for i in range(L)]                                    # [S, D + 2 Dkv, B]
        self._q5 = [x[:, :D].view(S, Hkv, G, hd, B) for x in self._slots]
        self._k5 = [x[:, D:D + Dkv].view(S, Hkv, 1, hd, B) for x in self._slots]
        self._v5 = [x[:, D + Dkv:].view(S, Hkv, 1, hd, B) for x in self._slots]
        # the products' workspace: fresh temporaries that grow by a slot every step would each be a new mmap
        self._ws = torch.empty(S, Hkv, G, hd, B, dtype=self.wdtype, device=self.dev)
        o = torch.empty(D, B, dtype=self.wdtype, device=self.dev)
        self._o5, self._o_t = o.view(Hkv, G, hd, B), o.t()       # the attention output, and as [B, D]
        if self.recording:   # [B, S, width] per recorded output and layer (batch-major: the replay reads [B, s,
            # width] views, contiguous when every slot was fed), the logits [B, S, V], the ids fed at every slot
            self._rec = {name: torch.empty(L, B, S, width, dtype=self.wdtype, device=self.dev)
                         for name, width in self._recorded_gemms().items()}
            self._rec_logits = torch.empty(B, S, self.head_w.shape[0], dtype=self.wdtype, device=self.dev)
            self._rec_ids = torch.empty(S, B, dtype=torch.long, device=self.dev)

    def _attend_prefill(self, i: int, q, k, v):
        """Causal attention of the contexts ``q [B, P, H, hd]``, ``k, v [B, P, Hkv, hd]`` (stored for the steps).
        Returns ``[B * P, H * hd]``."""
        self._store(i, q, k, v)
        return self._attend_all(i, q, k, v)

    def _attend_all(self, i: int, q, k, v):
        """Causal attention of every position of ``q [B, s, H, hd]`` over ``k, v [B, s, Hkv, hd]`` under the
        padding mask -> ``[B * s, H * hd]``. On the CPU the native kernels (:meth:`_attend_native`), else batched
        GEMMs with an additive mask at up to ``_BMM_MAX_LEN`` positions (SDPA's CPU kernel loops over (row, head)
        blocks: 2-3x slower forward and backward there); ``scaled_dot_product_attention`` elsewhere."""
        B, s, H, hd = q.shape
        if self.dev.type == "cpu" and self.attention != "sdpa":
            o = self._attend_native(i, (q, k, v))
            if o is not None:
                return o.view(B * s, H * hd)
        if self.dev.type == "cpu" and self.attention != "sdpa" and s <= _BMM_MAX_LEN:
            Hkv = self.n_kv
            G = H // Hkv
            # queries of one KV head together: [B * Hkv, G * s, hd] against keys [B * Hkv, s, hd]
            qg = q.view(B, s, Hkv, G, hd).permute(0, 2, 3, 1, 4).reshape(B * Hkv, G * s, hd)
            kg = k.transpose(1, 2).reshape(B * Hkv, s, hd)
            vg = v.transpose(1, 2).reshape(B * Hkv, s, hd)
            bias = self._bias_all(B, s, q.dtype)                      # [B or 1, 1, 1, s, s]
            # the same mask for every row (no padding): broadcast over the batch, not copied to [B * Hkv, ...]
            nb = bias.shape[0] * (Hkv if bias.shape[0] > 1 else 1)
            bias = bias.expand(bias.shape[0], Hkv if bias.shape[0] > 1 else 1, G, s, s).reshape(nb, G * s, s)
            sc = torch.baddbmm(bias, qg, kg.transpose(1, 2), alpha=self.scales[i])
            p = torch.softmax(sc, -1, dtype=torch.promote_types(sc.dtype, torch.float32)).to(vg.dtype)
            o = torch.bmm(p, vg).view(B, Hkv, G, s, hd)
            return o.permute(0, 3, 1, 2, 4).reshape(B * s, H * hd)
        gqa = {"enable_gqa": True} if self.n_kv != H else {}
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=self._mask, is_causal=self._mask is None and s > 1,
                                           scale=self.scales[i], **gqa)
        return o.transpose(1, 2).reshape(B * s, H * hd)

    def _attend_native(self, i: int, qkv):
        """:func:`fdpg.cpu_decode.attention` of ``qkv`` (q, k, v, or the three packed ``[B, s, H + 2 Hkv, hd]``)
        under the pass's padding mask -> ``[B, s, H * hd]``, or None where the native code cannot take it."""
        s = (qkv[0] if isinstance(qkv, tuple) else qkv).shape[1]
        valid = None if self.valid is None else self.valid[:, :s]
        return cpu_decode.attention(qkv, valid, self.scales[i], self.n_head, self.n_kv)

    def _bias_all(self, B: int, s: int, dtype):
        """The additive form of the causal and padding mask, ``[B or 1, 1, 1, s, s]`` (made once per pass)."""
        if self._bias_cache is None:
            allowed = self._mask if self._mask is not None else torch.ones(s, s, dtype=torch.bool,
                                                                           device=self.dev).tril()
            bias = torch.zeros(allowed.shape, dtype=dtype, device=self.dev).masked_fill_(~allowed, float("-inf"))
            self._bias_cache = bias.view(-1, 1, 1, s, s)
        return self._bias_cache

    def _attend_step(self, i: int, q, k, v):
        """One query per row, "sdpa" layout: ``q [B, 1, H, hd]``, ``k, v [B, 1, Hkv, hd]`` -> ``[B, H * hd]``."""
        B, _, H, hd = q.shape
        kv = _kv_pair(k, v)
        gqa = {"enable_gqa": True} if self.n_kv != H else {}
        if self.static:                     # the slot index on the device; unfilled slots masked by the bias
            idx = self._n_dev.view(1)
            if kv is not None:
                self.kvc[i].index_copy_(1, idx, kv)
            else:
                self.k[i].index_copy_(1, idx, k)
                self.v[i].index_copy_(1, idx, v)
            ck, cv, mask = self.k[i], self.v[i], self._sbias[..., :self.S]
        else:
            n = self.n + 1
            if kv is not None:
                self.kvc[i, :, self.n] = kv[:, 0]
            else:
                self.k[i, :, self.n] = k[:, 0]
                self.v[i, :, self.n] = v[:, 0]
            ck, cv = self.k[i, :, :n], self.v[i, :, :n]
            mask = None if self._sbias is None else self._sbias[..., :n]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), ck.transpose(1, 2), cv.transpose(1, 2),
                                           attn_mask=mask, scale=self.scales[i], **gqa)
        return o.reshape(B, H * hd)

    def _step_bias(self, P: int):
        """The steps' additive attention mask over the cache, ``[B, 1, 1, S]`` in the cache's dtype (0 at the slots
        a query may read, -inf elsewhere), made once per pass and opened a slot per step (:meth:`_step`): not
        converted from a boolean mask in every layer. Its rows are padded to a multiple of 8 elements, the
        alignment SDPA's memory-efficient kernel wants (else it pads a copy at every call). None where nothing
        is masked (dynamic steps without padding)."""
        if not self.static and self.valid is None:
            return None
        S8 = -(-self.S // 8) * 8
        bias = torch.full((self.B, 1, 1, S8), float("-inf"), dtype=self.k.dtype, device=self.dev)
        filled = torch.arange(self.S, device=self.dev) < P
        open_ = filled if self.valid is None else filled & self.valid
        bias[..., :self.S].masked_fill_(open_.view(-1, 1, 1, self.S), 0.0)
        return bias

    def _attend_slab(self, i: int):
        """One query per row from slot ``self.n`` of the slab (its q, k, v written there) -> ``[B, H * hd]``
        (a transposed view)."""
        n = self.n + 1
        ws = self._ws[:n]
        sc = torch.mul(self._k5[i][:n], self._q5[i][self.n], out=ws).sum(3, keepdim=True)   # [n, Hkv, G, 1, B]
        if self.valid is None:
            sc = sc.mul_(self.scales[i])
        else:
            sc = torch.add(self._bias[:n], sc, alpha=self.scales[i])
        torch.sum(torch.mul(torch.softmax(sc, 0), self._v5[i][:n], out=ws), 0, out=self._o5)
        return self._o_t

    def _prefill_mask(self, P: int):
        return self._prefill_mask_of(self.valid, P)

    def _prefill_mask_of(self, valid, P: int):
        if valid is None:
            return None                                          # is_causal
        keys = valid[:, None, None, :P]                          # [B, 1, 1, P]
        causal = torch.ones(P, P, dtype=torch.bool, device=self.dev).tril()
        # a padding query sees only itself (finite values in its own K/V slot, which no real query ever reads)
        return (causal & keys) | torch.eye(P, dtype=torch.bool, device=self.dev)

    # ---- the public steps -------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, context_ids, context_mask):
        B, P = context_ids.shape
        if B != self.B or not 0 < P <= self.S:
            raise ValueError(f"context_ids: expected [{self.B}, 1..{self.S}], got {list(context_ids.shape)}")
        self.n = 0
        self.slab = self.want_slab and not torch.is_autocast_enabled(self.dev.type)
        self.recording = (self.record and self.slab and not self.cast and bool(self._recorded_gemms())
                          and self._record_bytes() <= RECORD_MAX_BYTES)
        self.fuse_norms = _fused_norms(self.dev, not self.slab)
        self.P, self._versions = P, None
        self._graph = None          # a captured step reads this pass's tables (positions, mask): capture anew
        if self.slab and self.kv is None:
            self._alloc_slab()
        if context_mask is None:
            self.valid = None
            pos = torch.arange(P, device=self.dev).expand(B, P)
        else:
            self.valid = torch.ones(B, self.S, dtype=torch.bool, device=self.dev)
            self.valid[:, :P] = context_mask
            pos = (context_mask.long().cumsum(1) - 1).clamp_min(0)
            if self.slab:
                self._bias = torch.zeros(self.S, 1, 1, 1, B, device=self.dev).masked_fill_(
                    ~self.valid.t()[:, None, None, None, :], float("-inf"))
        self.pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(self.S - P, device=self.dev)], 1)
        self._start()
        self._mask, self._bias_cache = self._prefill_mask(P), None
        h = self._forward(context_ids, prefill=True)               # [B, d], the last position
        if self.recording:
            self._rec_ids[:P].copy_(context_ids.t())
        self.n = P
        if self.static:
            self._n_dev = torch.full((), P, dtype=torch.long, device=self.dev)
        self._sbias = None if self.slab else self._step_bias(P)
        return self._logits(h, P - 1)

    @torch.no_grad()
    def step(self, tokens):
        """Append ``tokens [B]`` (the next position of every row) and return the next logits ``[B, V]``."""
        if self.n >= self.S:
            raise ValueError(f"the cache is full ({self.S} positions)")
        if tokens.shape != (self.B,):
            if tokens.numel() != self.B:
                raise ValueError(f"tokens: expected [{self.B}] (one per row), got {list(tokens.shape)}")
            tokens = tokens.reshape(self.B)
        out = self._graph_step(tokens) if self.cuda_graph else self._step(tokens)
        self.n += 1
        return out

    def _graph_step(self, tokens):
        """:meth:`_step` replayed from a CUDA graph captured at the first step (one launch per token instead of a
        few hundred). The graph reads the live weights and writes the cache in place, so it stays valid for the
        whole pass; a capture that fails falls back to the eager step (with a warning)."""
        if self._graph is None:
            tok, n0 = tokens.clone(), self._n_dev.clone()
            try:
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(torch.cuda.current_stream(self.dev))
                with torch.cuda.stream(side):        # warm-up: lazy initialisations happen outside the capture
                    self._step(tok)
                torch.cuda.current_stream(self.dev).wait_stream(side)
                self._n_dev.copy_(n0)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self._step(tok)
            except Exception as e:  # an op that cannot be captured: decode eagerly
                import warnings

                warnings.warn(f"fdpg.decode: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                self.cuda_graph = False
                self._n_dev.copy_(n0)
                return self._step(tokens)
            self._graph = (graph, tok, out)
        graph, tok, out = self._graph
        tok.copy_(tokens)
        graph.replay()
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The final-norm hidden states ``[B, s, d]`` of every position of ``ids [B, s]`` (left-padded, ``mask
        [B, s]`` bool or None), with autograd (no cache: the scoring pass). Call on a decoder made with
        ``max_len = s``."""
        B, s = ids.shape
        if B != self.B or s != self.S:
            raise ValueError(f"ids: expected [{self.B}, {self.S}], got {list(ids.shape)}")
        self.n, self.slab, self._prefilling, self._per_pass = 0, False, True, {}
        self.valid = mask
        self.pos = (torch.arange(s, device=self.dev).expand(B, s) if mask is None
                    else (mask.long().cumsum(1) - 1).clamp_min(0))
        self._start()
        h = self._native_forward(ids)
        if h is not None:
            return h
        self._mask, self._bias_cache = self._prefill_mask(s), None
        x = self._embed(ids)                                      # [B * s, d]
        for i in range(self.n_layer):
            a = self._attend_all(i, *self._qkv(i, self._norm1(i, x), s))
            x = self._mlp(i, self._attn_out(i, a, x))
        self._mask = self._bias_cache = None
        return self._final_norm(x).view(B, s, -1)

    def _step(self, tokens):
        """One token per row; static, it reads no host-side state that changes between tokens (CUDA-graph and
        torch.compile friendly: fixed shapes, device-side position and slot index)."""
        if self._sbias is not None:         # the slot being filled joins the keys (every row's is a real token)
            if self.static:
                self._sbias.index_fill_(3, self._n_dev.view(1), 0.0)
            else:
                self._sbias[..., self.n] = 0.0
        if self.recording:
            self._rec_ids[self.n].copy_(tokens)
        h = self._forward(tokens, prefill=False)
        if self.static:
            self._n_dev += 1
        return self._logits(h, self.n, normed=self.fuse_norms)

    def _slot(self, table):
        """Row ``n`` (the slot being filled) of a per-slot table ``[B, S, ...]``: ``[B, ...]``."""
        if self.static:
            return table.index_select(1, self._n_dev.view(1)).squeeze(1)
        return table[:, self.n]

    def _forward(self, ids, prefill: bool):
        """The layers over the contexts ``ids [B, P]`` (prefill) or one token per row ``ids [B]`` at slot
        ``self.n``: the last position's hidden state ``[B, d]``."""
        self._prefilling, self._per_pass = prefill, {}           # what a family computes once for all layers
        s = ids.shape[1] if prefill else 1
        x = self._embed(ids)                                      # [B * s, d]
        if not prefill and self.fuse_norms:
            return self._step_layers_fused(x)
        for i in range(self.n_layer):
            h = self._norm1(i, x)
            if prefill:
                a = self._attend_prefill(i, *self._qkv(i, h, s))
            elif self.slab:
                self._qkv_slab(i, h, self._slots[i][self.n])
                a = self._attend_slab(i)
            else:
                a = self._attend_step(i, *self._qkv(i, h, 1))
            x = self._mlp(i, self._attn_out(i, a, x))
        return x.view(self.B, s, -1)[:, -1] if prefill else x

    def _start(self):
        pass

    def _native_forward(self, ids):
        """The scoring forward's result in one native call where a family has one and can take it, else None."""
        return None

    # ---- a layer as its family describes it: _RMS (RMSNorm, else LayerNorm), _NORMS (positions in a block of the
    # norms before attention and before the MLP), self.final_norm, _proj(i, a) (attention output projection),
    # _ffn(i, h) (the MLP of normed h) -------------------------------------------------------------------------

    _RMS = False
    _NORMS: tuple = ()

    def _norm(self, x, norm):
        return _rms(x, norm) if self._RMS else _ln(x, norm)

    def _norms(self, i):
        return tuple(self.blocks[i][j] for j in self._NORMS)

    def _norm1(self, i, x):
        return self._norm(x, self._norms(i)[0])

    def _final_norm(self, h):
        return self._norm(h, self.final_norm)

    def _attn_out(self, i, a, x):
        return x + self._proj(i, a)

    def _mlp(self, i, x):
        return x + self._ffn(i, self._norm(x, self._norms(i)[1]))

    def _step_layers_fused(self, x):
        """A step's layers over ``x [B, d]`` with every residual add, the norm after it and the norm's cast to the
        GEMM dtype in one kernel (:func:`fdpg.kernels.norms.add_norm`; the residual stream updated in place):
        the final norm's output ``[B, d]``."""
        from .kernels.norms import add_norm

        dt = (torch.get_autocast_dtype(self.dev.type) if torch.is_autocast_enabled(self.dev.type)
              else self.head_w.dtype)

        def norm(x, delta, m):
            return add_norm(x, delta, m.weight, None if self._RMS else m.bias,
                            m.variance_epsilon if self._RMS else m.eps, rms=self._RMS, out_dtype=dt, inplace=True)

        delta = None                        # the branch output not yet added to x
        for i in range(self.n_layer):
            n1, n2 = self._norms(i)
            x, h = norm(x, delta, n1)
            a = self._attend_step(i, *self._qkv(i, h, 1))
            x, h = norm(x, self._proj(i, a), n2)
            delta = self._ffn(i, h)
        return norm(x, delta, self.final_norm)[1]

    def _logits(self, h, slot: int, normed: bool = False):
        """The logits ``[B, V]`` at position ``slot`` (recorded when recording) from its hidden state ``h`` (the
        final norm's output when ``normed``)."""
        out = self._rec_logits[:, slot] if self.recording else None
        h = h if normed else self._final_norm(h)
        if out is None:
            return linear(h, self.head_w, self.head_b)
        if self.head_b is None:
            return torch.mm(h, self.head_w.t(), out=out)
        return torch.addmm(self.head_b, h, self.head_w.t(), out=out)

    # ---- recording the sampling pass, and replaying it as the policy's scoring pass -------------------------

    def _record_bytes(self) -> int:
        """What recording adds to the cache: every recorded output and the logits, at every slot."""
        width = self.n_layer * sum(self._recorded_gemms().values()) + self.head_w.shape[0]
        return self.S * self.B * width * torch.empty((), dtype=self.wdtype).element_size()

    def _recorded_gemms(self) -> dict:
        """``{name: output width}`` of the GEMMs a family records besides QKV (in the slab) and the logits; empty
        where the family cannot replay."""
        return {}

    def _gemm(self, name: str, i: int, bias, h, w):
        """``h @ w + bias`` (``w [in, out]``), written into its record at the current slot when recording."""
        if not self.recording or name not in self._rec:
            return linear(h, w, bias, w_out_in=False)
        if self._prefilling:
            return self._keep(name, i, linear(h, w, bias, w_out_in=False))
        return torch.addmm(bias, h, w, out=self._rec[name][i][:, self.n])

    def _linear(self, name: str, i: int, lin, h):
        """``lin(h)`` (``h [rows, in]``, a Linear's ``weight [out, in]``), recorded like :meth:`_gemm`."""
        if not self.recording:
            return linear(h, lin.weight, lin.bias)
        if self._prefilling:
            return self._keep(name, i, linear(h, lin.weight, lin.bias))
        out = self._rec[name][i][:, self.n]
        if lin.bias is None:
            return torch.mm(h, lin.weight.t(), out=out)
        return torch.addmm(lin.bias, h, lin.weight.t(), out=out)

    def _keep(self, name: str, i: int, y):
        """Record ``y`` (``[B * P, width]`` in the prefill, ``[B, width]`` in a step) when recording."""
        if self.recording and name in self._rec:
            rec = self._rec[name][i]
            if self._prefilling:
                rec[:, :self.P].copy_(y.view(self.B, self.P, -1))
            else:
                rec[:, self.n].copy_(y)
        return y

    @property
    def can_replay(self) -> bool:
        """Whether :meth:`replay_logits` can stand in for a scoring pass (recorded, weights unchanged since)."""
        if not (self.recording and self.n > 0 and self._versions is not None):
            return False
        versions, norms = self._weight_versions()
        return versions == self._versions[0] and torch.equal(norms, self._versions[1])

    def _weight_versions(self):
        """The weights' version counters and norms: an in-place update changes the first, except through fused
        optimizer kernels (which bypass them), and those change the second."""
        params = [p.detach() for p in self.model.parameters()]
        return [p._version for p in params], torch.stack(torch._foreach_norm(params))

    def seal(self):
        """Mark the end of the sampling pass: from here the recorded outputs are those of the current weights
        (an in-place update of any weight, such as an optimizer step, voids them)."""
        if self.recording:
            self._versions = self._weight_versions()

    def replay_logits(self, T: int, *, check: bool = True) -> torch.Tensor:
        """The logits ``[B, T, V]`` at positions ``P-1 .. P+T-2`` (those that predict the ``T`` tokens drawn),
        with autograd into the model's weights: the policy's scoring pass, its GEMMs taken from the recording
        (:class:`_Replay`), its cheap ops (embeddings, norms, attention, activations) recomputed. Equal to a fresh
        forward pass to float rounding, at a fraction of its cost. ``check=False`` skips the test that the weights
        are those of the recording (for a caller that knows: it reads the weights' norms back to the host)."""
        if not (self.recording and self._versions is not None) or (check and not self.can_replay):
            raise RuntimeError("replay_logits: nothing recorded for the current weights (decoder(record=True) on "
                               "the CPU slab path, then seal() after sampling, and no weight update since)")
        s = self.P + T - 1
        if not (0 < T and s <= self.n):
            raise ValueError(f"T: expected 1..{self.n - self.P + 1} (the positions fed), got {T}")
        valid = None if self.valid is None else self.valid[:, :s]
        self._mask, self._bias_cache = self._prefill_mask_of(valid, s), None
        x = self._replay_embed(self._rec_ids[:s].t())               # [B, s, d]
        for i in range(self.n_layer):
            x = self._replay_layer(i, x, s)
        self._mask = self._bias_cache = None
        h = self._final_norm(x[:, self.P - 1:s])                    # [B, T, d]
        z = self._rec_logits[:, self.P - 1:s]                       # [B, T, V]
        return _Replay.apply(h, self.head_w, self.head_b, z, True)


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _stack(linears, dtype):
    """The weights ``[out_j, in]`` (and biases, zeros standing in for a missing one) of ``linears`` stacked along
    the outputs and cast to ``dtype``, without a float32 temporary: ``(weight, bias or None)``."""
    w0 = linears[0].weight
    w = torch.empty(sum(m.weight.shape[0] for m in linears), w0.shape[1], dtype=dtype, device=w0.device)
    has_b = any(m.bias is not None for m in linears)
    b = torch.zeros(w.shape[0], dtype=dtype, device=w0.device) if has_b else None
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        w[at:at + n].copy_(m.weight.detach())
        if m.bias is not None:
            b[at:at + n].copy_(m.bias.detach())
        at += n
    return w, b


def _kv_pair(k, v):
    """``k, v [B, s, Hkv, hd]`` as one ``[B, s, 2, Hkv, hd]`` view where ``v`` follows ``k`` in memory at equal
    strides (the outputs of a fused QKV GEMM), else None."""
    B, s, Hkv, hd = k.shape
    st = k.stride()
    if (v.shape != k.shape or v.stride() != st or v.dtype != k.dtype or st[3] != 1 or st[2] != hd
            or v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
            or v.data_ptr() - k.data_ptr() != Hkv * hd * k.element_size()):
        return None
    return k.as_strided((B, s, 2, Hkv, hd), (st[0], st[1], Hkv * hd, hd, 1))


def _act(act, x):
    """``act(x)`` for a Hugging Face activation module: GELU as one op where :data:`_GELU_KIND` knows its form
    (Hugging Face's tanh-GELU is eight elementwise ops, each a kernel and, with autograd, a saved tensor), the
    module itself elsewhere."""
    kind = _GELU_KIND.get(type(act).__name__)
    return act(x) if kind is None else F.gelu(x, approximate=kind)


class _GPT2(_FastDecoder):
    def __init__(self, model, batch_size, max_len, **kw):
        super().__init__(model, batch_size, max_len, **kw)
        cfg, tr = model.config, model.transformer
        self.n_layer, self.n_head = len(tr.h), cfg.n_head
        self.n_kv, self.d = self.n_head, cfg.n_embd
        self.hd = self.d // self.n_head
        self.D = self.Dkv = self.d
        self.wte, self.wpe, self.final_norm = tr.wte.weight, tr.wpe.weight, tr.ln_f
        self.pad_idx = tr.wte.padding_idx           # (its row gets no gradient, as in nn.Embedding)
        self.blocks = [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.act, b.mlp.c_proj)
                       for b in tr.h]
        self._blocks_changed()
        self.scales = []
        for i in range(self.n_layer):
            scale = self.hd ** -0.5 if cfg.scale_attn_weights else 1.0
            self.scales.append(scale / float(i + 1) if cfg.scale_attn_by_inverse_layer_idx else scale)

    _GEMMS = (1, 2, 4, 6)

    def _blocks_changed(self):
        self.qkv_t = [(b[1].bias[:, None], b[1].weight.t()) for b in self.blocks]    # views

    def _start(self):
        n_pos = self.wpe.shape[0]
        if self.S > n_pos and int(self.pos.max()) >= n_pos:        # (a host sync only when it can overflow)
            raise ValueError(f"max_len: positions up to {int(self.pos.max())} exceed the model's {n_pos} "
                             "(n_positions); shorten the contexts or max_length")
        self.pe = F.embedding(self.pos, self.wpe)                   # [B, S, d]: every slot's position embedding

    def _embed(self, ids):
        if self._prefilling:
            return (F.embedding(ids, self.wte, self.pad_idx) + self.pe[:, :ids.shape[1]]).view(-1, self.d)
        return F.embedding(ids, self.wte, self.pad_idx) + self._slot(self.pe)

    _NORMS = (0, 3)

    def _native_forward(self, ids):
        return cpu_decode.forward(self, ids)       # on the CPU without autograd (fdpg/cpu_decode.c)

    def _qkv(self, i, h, s):
        c_attn = self.blocks[i][1]
        qkv = linear(h, c_attn.weight, c_attn.bias, w_out_in=False)
        return qkv.view(self.B, s, 3, self.n_head, self.hd).unbind(2)

    def _qkv_slab(self, i, h, slot):
        bias, w_t = self.qkv_t[i]                                  # slot [3D, B] = W^T h^T + b
        torch.addmm(bias, w_t, h.t(), out=slot)

    def _proj(self, i, a):
        c_proj = self.blocks[i][2]
        return self._gemm("proj", i, c_proj.bias, a, c_proj.weight)

    def _ffn(self, i, h):
        _, _, _, _, c_fc, act, m_proj = self.blocks[i]
        f = self._gemm("fc", i, c_fc.bias, h, c_fc.weight)
        g = cpu_decode.activation(f, act)                          # no autograd: one C pass
        g = self._keep("act", i, _act(act, f) if g is None else g)
        if self.recording and "dact" in self._rec:
            self._keep("dact", i, _gelu_grad(f, _GELU_KIND[type(act).__name__]))
        return self._gemm("mlp", i, m_proj.bias, g, m_proj.weight)

    def _recorded_gemms(self):
        width = self.blocks[0][4].weight.shape[1]
        gelu = _GELU_KIND.get(type(self.blocks[0][5]).__name__)
        # GELU: its output and derivative; the fc output's value is then never read (see _replay_layer)
        return {"proj": self.d, "mlp": self.d, **({"act": width, "dact": width} if gelu else {"fc": width})}

    def _replay_embed(self, ids):
        return F.embedding(ids, self.wte, self.pad_idx) + F.embedding(self.pos[:, :ids.shape[1]], self.wpe)

    def _replay_layer(self, i, x, s):
        """Layer ``i`` over ``x [B, s, d]`` with the recorded GEMM outputs (``[B, s, width]`` views)."""
        ln1, c_attn, c_proj, ln2, c_fc, act, m_proj = self.blocks[i]
        B, H, hd, D = self.B, self.n_head, self.hd, self.D
        rec = {k: v[i, :, :s] for k, v in self._rec.items()}
        qkv = _Replay.apply(_ln(x, ln1), c_attn.weight, c_attn.bias, self._slots[i][:s].permute(2, 0, 1), False)
        a = self._attend_native(i, qkv.view(B, s, 3 * H, hd))     # one gradient tensor for q, k and v
        a = (self._attend_all(i, *qkv.view(B, s, 3, H, hd).unbind(2)) if a is None else a).view(B, s, D)
        x = x + _Replay.apply(a, c_proj.weight, c_proj.bias, rec["proj"], False)
        if "act" in rec:   # GELU's backward takes the recorded derivative, not fc's output: act is its stand-in
            f = _Replay.apply(_ln(x, ln2), c_fc.weight, c_fc.bias, rec["act"], False)
            return x + _ReplayGELULinear.apply(f, rec["act"], rec["dact"], m_proj.weight, m_proj.bias, rec["mlp"])
        g = _act(act, _Replay.apply(_ln(x, ln2), c_fc.weight, c_fc.bias, rec["fc"], False))
        return x + _Replay.apply(g, m_proj.weight, m_proj.bias, rec["mlp"], False)


def _rms(x, norm):
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)    # one op, same math
    dt = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(dt)


def _rotary(x, cos, sin, inplace: bool, dim: int = -1):
    """RoPE over dimension ``dim`` (the head's), ``x * cos + rotate_half(x) * sin`` with ``sin`` carrying
    rotate_half's sign (``rotate_half(x) = roll(x, hd/2) * sign``): three kernels, not seven. A new tensor in the
    type promotion of ``x`` and ``cos`` (float32 under autocast, as the model's), or, ``inplace`` (no autograd),
    written back into ``x``: rounded to its dtype as SDPA under autocast would round it (the cache then holds what
    attention reads), and the k and v of a fused QKV GEMM left side by side for the cache; where ``x`` holds the
    promoted dtype already, computed in place without a temporary."""
    r = torch.roll(x, x.shape[dim] // 2, dim)
    if not inplace:
        return torch.addcmul(x * cos, r, sin)
    if torch.result_type(x, cos) == x.dtype:
        return x.mul_(cos).addcmul_(r, sin)
    return x.copy_((x * cos).addcmul_(r, sin))


def _linear_t(lin, h, out):
    """``out [N, B] = W h^T + b`` (the transposed output of ``lin`` written in place)."""
    if lin.bias is None:
        torch.mm(lin.weight, h.t(), out=out)
    else:
        torch.addmm(lin.bias[:, None], lin.weight, h.t(), out=out)


class _Llama(_FastDecoder):
    def __init__(self, model, batch_size, max_len, **kw):
        super().__init__(model, batch_size, max_len, **kw)
        cfg, base = model.config, model.model
        self.n_layer, self.n_head, self.n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = cfg.hidden_size
        self.hd = getattr(cfg, "head_dim", None) or self.d // self.n_head
        self.D, self.Dkv = self.n_head * self.hd, self.n_kv * self.hd
        self.emb, self.final_norm, self.rotary = base.embed_tokens.weight, base.norm, base.rotary_emb
        self.pad_idx = base.embed_tokens.padding_idx   # (its row gets no gradient, as in nn.Embedding)
        self.blocks = [(b.input_layernorm, b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                        b.self_attn.o_proj, b.post_attention_layernorm, b.mlp.gate_proj, b.mlp.up_proj,
                        b.mlp.act_fn, b.mlp.down_proj) for b in base.layers]
        self.scales = [getattr(b.self_attn, "scaling", self.hd ** -0.5) for b in base.layers]

    _GEMMS = (1, 2, 3, 4, 6, 7, 9)
    _FUSED = ((1, 2, 3), (6, 7))                                  # q, k, v; gate, up

    def _start(self):
        # cos/sin of every slot of every row: [B, S, hd] (the rotary module's own computation), with rotate_half's
        # sign folded into sin: rotate_half(x) = roll(x, hd/2) * sign
        x = torch.empty(0, dtype=self.emb.dtype, device=self.dev)
        self.cos, sin = self.rotary(x, self.pos)
        h = self.hd // 2
        self.sin_s = sin * torch.cat([-torch.ones(h), torch.ones(self.hd - h)]).to(sin)
        if self.slab:                                               # feature-major [S, hd, B]
            self.cos_t = self.cos.permute(1, 2, 0).contiguous()
            self.sin_t = self.sin_s.permute(1, 2, 0).contiguous()

    def _embed(self, ids):
        return F.embedding(ids, self.emb, self.pad_idx).view(-1, self.d)

    def _native_forward(self, ids):
        return cpu_decode.forward(self, ids)       # on the CPU without autograd, float32 (fdpg/cpu_decode.c)

    _RMS, _NORMS = True, (0, 5)

    def _rope(self, s):
        """cos, sin (signed: see :func:`_rotary`) ``[B, s, 1, hd]`` of the positions being computed (a step's
        taken once for all layers)."""
        if self._prefilling:
            return self.cos[:, :s, None], self.sin_s[:, :s, None]
        if "rope" not in self._per_pass:
            self._per_pass["rope"] = (self._slot(self.cos)[:, None, None], self._slot(self.sin_s)[:, None, None])
        return self._per_pass["rope"]

    def _qkv(self, i, h, s):
        B, H, Hkv, hd = self.B, self.n_head, self.n_kv, self.hd
        cos, sin = self._rope(s)
        if self.fused is not None:          # one GEMM; q and k rotated together, k and v left side by side
            qkv = self.fused[i][0]
            y = linear(h, qkv.weight, qkv.bias).view(B, s, H + 2 * Hkv, hd)
            qk = _rotary(y[:, :, :H + Hkv], cos, sin, not torch.is_grad_enabled())
            return qk[:, :, :H], qk[:, :, H:], y[:, :, H + Hkv:]
        _, qp, kp, vp = self.blocks[i][:4]
        q = self._keep("q", i, linear(h, qp.weight, qp.bias)).view(B, s, H, hd)
        k = self._keep("k", i, linear(h, kp.weight, kp.bias)).view(B, s, Hkv, hd)
        v = linear(h, vp.weight, vp.bias).view(B, s, Hkv, hd)
        inplace = not torch.is_grad_enabled()                     # fresh GEMM outputs (recorded ones copied)
        return _rotary(q, cos, sin, inplace), _rotary(k, cos, sin, inplace), v

    def _qkv_slab(self, i, h, slot):
        _, qp, kp, vp = self.blocks[i][:4]
        D, Dkv, hd = self.D, self.Dkv, self.hd
        cos, sin = self.cos_t[self.n], self.sin_t[self.n]          # [hd, B]
        _linear_t(qp, h, slot[:D])
        _linear_t(kp, h, slot[D:D + Dkv])
        _linear_t(vp, h, slot[D + Dkv:])
        if self.recording:                                          # q and k before RoPE
            self._keep("q", i, slot[:D].t())
            self._keep("k", i, slot[D:D + Dkv].t())
        _rotary(slot[:D + Dkv].view(-1, hd, self.B), cos, sin, True, dim=1)   # q's and k's heads together

    def _proj(self, i, a):
        return self._linear("o", i, self.blocks[i][4], a)

    def _ffn(self, i, h):
        _, _, _, _, _, _, gp, up, act, dp = self.blocks[i]
        if self.fused is not None:                                # gate and up in one GEMM
            gu = self.fused[i][1]
            g, u = linear(h, gu.weight, gu.bias).chunk(2, -1)
        else:
            g, u = self._linear("gate", i, gp, h), self._linear("up", i, up, h)
        return self._linear("down", i, dp, act(g) * u)

    def _recorded_gemms(self):
        F_ = self.blocks[0][6].weight.shape[0]
        return {"q": self.D, "k": self.Dkv, "o": self.d, "gate": F_, "up": F_, "down": self.d}

    def _replay_embed(self, ids):
        return F.embedding(ids, self.emb, self.pad_idx)

    def _replay_layer(self, i, x, s):
        """Layer ``i`` over ``x [B, s, d]`` with the recorded GEMM outputs (q and k before RoPE; v from the slab)."""
        n1, qp, kp, vp, op, n2, gp, up, act, dp = self.blocks[i]
        B, H, Hkv, hd, D, Dkv = self.B, self.n_head, self.n_kv, self.hd, self.D, self.Dkv
        rec = {k: v[i, :, :s] for k, v in self._rec.items()}
        h = _rms(x, n1)
        cos, sin = self.cos[:, :s, None], self.sin_s[:, :s, None]
        q = _Replay.apply(h, qp.weight, qp.bias, rec["q"], True).view(B, s, H, hd)
        k = _Replay.apply(h, kp.weight, kp.bias, rec["k"], True).view(B, s, Hkv, hd)
        v = _Replay.apply(h, vp.weight, vp.bias, self._slots[i][:s, D + Dkv:].permute(2, 0, 1), True)
        a = self._attend_all(i, _rotary(q, cos, sin, False), _rotary(k, cos, sin, False),
                             v.view(B, s, Hkv, hd)).view(B, s, D)
        x = x + _Replay.apply(a, op.weight, op.bias, rec["o"], True)
        h = _rms(x, n2)
        g = act(_Replay.apply(h, gp.weight, gp.bias, rec["gate"], True)) * _Replay.apply(h, up.weight, up.bias,
                                                                                        rec["up"], True)
        return x + _Replay.apply(g, dp.weight, dp.bias, rec["down"], True)


class _Replay(torch.autograd.Function):
    """``y = h @ w + b`` (``w [in, out]``; ``w [out, in]`` when ``w_out_in``) whose value ``y [..., out]`` was
    computed already, by the sampling pass: the forward returns it, the backward is the GEMM's."""

    @staticmethod
    def forward(ctx, h, w, b, y, w_out_in: bool):
        ctx.save_for_backward(h, w)
        ctx.w_out_in, ctx.has_b = w_out_in, b is not None
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        h, w = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh, dw, db = linear_grads(dy.reshape(-1, dy.shape[-1]), h.reshape(-1, h.shape[-1]), w, ctx.w_out_in,
                                  (need_h, need_w, need_b and ctx.has_b))
        return None if dh is None else dh.view(h.shape), dw, db, None, None


# Hugging Face's GELU modules and the form of their function (F.gelu's ``approximate``): their recorded outputs
# are replayed with GELU's backward
_GELU_KIND = {"GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "NewGELUActivation": "tanh",
              "FastGELUActivation": "tanh", "GELUActivation": "none"}


def _gelu_grad(x, approximate: str):
    """GELU's derivative at ``x`` (``approximate``: "tanh" or "none", as F.gelu's)."""
    return torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate=approximate)


class _ReplayGELULinear(torch.autograd.Function):
    """``y = gelu(f) @ w + b`` (``w [in, out]``) whose GELU output ``g``, derivative ``dg_df`` and ``y`` were
    computed already (by the sampling pass): the forward returns ``y``; the backward's ``dy @ w^T`` is multiplied
    by ``dg_df`` in place (no second ``[N, in]`` tensor)."""

    @staticmethod
    def forward(ctx, f, g, dg_df, w, b, y):
        ctx.save_for_backward(g, dg_df, w)
        ctx.has_b = b is not None
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        g, dg_df, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        need_f, _, _, need_w, need_b, _ = ctx.needs_input_grad
        df, dw, db = linear_grads(dy.reshape(-1, dy.shape[-1]), g2, w, False, (need_f, need_w, need_b and ctx.has_b))
        df = None if df is None else df.mul_(dg_df.reshape(g2.shape)).view(g.shape)
        return df, None, None, dw, db, None


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  attention: str = "auto") -> torch.Tensor:
    """The last hidden states ``[B, s, d]`` (after the final norm) of ``input_ids [B, s]`` long, left-padded with
    ``attention_mask [B, s]`` (0/1 or bool; None: no padding), positions counting real tokens only; with autograd.
    What ``model.base_model(...)[0]`` returns (to float rounding; padding positions excepted), through fdpg's own
    forward when :func:`fast_path_reason` finds nothing against it (no host sync; on the CPU, attention by batched
    GEMMs unless ``attention="sdpa"``), else through the model's."""
    if fast_path_reason(model) is not None:
        pos = None if attention_mask is None else (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                use_cache=False)[0]
    B, s = input_ids.shape
    cls = _GPT2 if type(model).__name__ == "GPT2LMHeadModel" else _Llama
    mask = None if attention_mask is None else attention_mask.bool()
    return cls(model, B, s, attention=attention).forward(input_ids, mask)


def decoder(model, batch_size: int, max_len: int, *, fast: bool = True, static: bool = False,
            attention: str = "auto", record: bool = False, cuda_graph: bool = False) -> Decoder:
    """A :class:`Decoder` for ``batch_size`` rows of at most ``max_len`` positions (context included): the fast
    path when ``fast`` and :func:`fast_path_reason` finds none against it, else Hugging Face's forward.

    ``static``: fixed shapes per step (see the module docstring). ``attention`` of a single query: "auto"
    ("broadcast" on the CPU without autocast, "sdpa" elsewhere), "sdpa" or "broadcast" (the "slab" layout).
    ``record``: keep the pass for :meth:`_FastDecoder.replay_logits` (the CPU slab path). ``cuda_graph`` (with
    ``static``, on a GPU): every step after the first replays one CUDA graph, and returns the same logits tensor
    each time (read it, or clone it, before the next step). Under autocast, enter it with ``cache_enabled=False``
    around each step (a cached cast would outlive its memory in the graph).
    """
    if fast and fast_path_reason(model) is None:
        cls = _GPT2 if type(model).__name__ == "GPT2LMHeadModel" else _Llama
        return cls(model, batch_size, max_len, static=static, attention=attention, record=record,
                   cuda_graph=cuda_graph)
    return _HFDecoder(model)
