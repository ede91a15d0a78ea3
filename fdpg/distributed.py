"""Multi-GPU training on ``torch.distributed``: launch with ``torchrun``; DDP or FSDP2 for the policy.

    torchrun --standalone --nproc_per_node 8 -m fdpg.cli train config.yaml distributed.strategy=fsdp

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) :func:`setup` joins the process group (NCCL for CUDA, gloo for the
CPU) and every rank trains on its own ``batch_size`` samples: W ranks with per-rank batch b train like one process
with batch W·b.

- **Policy.** ``strategy: ddp`` (models that fit on one GPU): DDP over a small module whose ``forward`` scores a
  batch, so its gradient hooks see the scoring pass. ``strategy: fsdp`` (models that do not): FSDP2
  (``fully_shard``) on every transformer block, then on the whole model; the fused output-layer op runs inside a
  method registered with ``register_fsdp_forward_method``, so the output layer's weight is all-gathered (a plain
  tensor with autograd) while the op runs and its gradient is reduce-scattered like any other.
- **Prior (and the KL-adaptive proposal).** Frozen: replicated under DDP, sharded the same way under FSDP. The
  prior runs in inference mode (under FSDP its parameters are first gathered once outside inference mode, so FSDP's
  reused all-gather buffers are ordinary tensors).
- **Global statistics.** Every statistic that couples the batch (log Z and its running estimate, the baseline,
  normalised weights, ESS, divergence estimates, the KL-adaptive decision, every logged metric) is computed on the
  *global* batch: each rank gathers the per-sequence scalars of all ranks (a few floats a sequence) and computes the
  statistic on the concatenation exactly as one process would, keeping its own slice of the coefficients. So the
  numbers equal those of one process with batch W·b on the same samples, up to float rounding.
- **Gradient.** Each rank's surrogate is ``mean over its b sequences of c_i log pi(x_i)``; DDP and FSDP average
  gradients over ranks, which gives ``(1/(W b)) sum_i c_i grad log pi(x_i)``: the one-process gradient.
- **I/O.** Rank 0 writes metrics, checkpoints (atomically) and the final policy; under FSDP the full state dicts are
  gathered to rank 0 first (``torch.distributed.checkpoint.state_dict``). Every rank resumes from the same
  checkpoint, which therefore must be on a filesystem all nodes see. Sampling generators are seeded per rank
  (:func:`rank_seed`); their states are checkpointed per rank.
"""
from __future__ import annotations

import contextlib
import json
import os
import types
from pathlib import Path

import torch
import torch.distributed as dist

import fdpg

__all__ = [
    "STRATEGIES", "Parallel", "is_initialized", "rank", "world_size", "is_main", "setup", "teardown",
    "all_gather_cat", "all_gather_object", "broadcast_object", "all_reduce_sum", "all_reduce_mean", "barrier",
    "rank_seed", "main_first",
]

STRATEGIES = ("ddp", "fsdp")


# ---- the process group ----------------------------------------------------------------------------------------

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device | str | None = None) -> torch.device:
    """Join the process group torchrun describes; a no-op outside torchrun. Returns this rank's device.

    Backend: NCCL for CUDA devices, gloo for the CPU. On CUDA each rank takes ``cuda:LOCAL_RANK`` (whatever index
    ``device`` names). Without torchrun, ``device`` is returned unchanged.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not under_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (the same shape on every rank) along dim 0 over ranks, in rank order."""
    if not is_initialized() or world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` outside a process group."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself outside a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def rank_seed(seed: int, r: int | None = None) -> int:
    """A distinct, reproducible seed per rank (rank 0 keeps ``seed``, so a one-process run is unchanged)."""
    r = rank() if r is None else r
    return (seed + 1_000_003 * r) % (2**63 - 1)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. writes a file), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---- scoring inside a forward ---------------------------------------------------------------------------------

def _seq_logprobs_fused(model, input_ids, attention_mask, position_ids, P: int, tokens, mask) -> torch.Tensor:
    """``log model(x)`` ``[B]`` float32: the base model's last hidden states, then the fused output-layer op with
    the output layer's weight as the module holds it (all-gathered when this runs as an FSDP forward)."""
    sl = slice(P - 1, P + tokens.shape[1] - 1)
    h = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)[0][:, sl]
    head = model.get_output_embeddings()
    tok = fdpg.linear_token_logprobs(h, head.weight, tokens, bias=head.bias, validate=False)
    return fdpg.sequence_logprobs(tok, mask, validate=False)


def _fdpg_seq_logprobs(self, input_ids, attention_mask, position_ids, P, tokens, mask):
    return _seq_logprobs_fused(self, input_ids, attention_mask, position_ids, P, tokens, mask)


class _Scorer(torch.nn.Module):
    """DDP's entry point: ``forward`` scores a batch (fused: ``[B]`` log-probs; else the logits ``[B, P+T, V]``),
    so DDP's gradient hooks are armed by the pass that the loss goes through."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, P: int, tokens, mask, fused: bool):
        if fused:
            return _seq_logprobs_fused(self.model, input_ids, attention_mask, position_ids, P, tokens, mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


def _blocks(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (each becomes one FSDP unit): the classes named in the Hugging Face model's
    ``_no_split_modules``, else the items of its ModuleLists."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        found = [m for ml in model.modules() if isinstance(ml, torch.nn.ModuleList) for m in ml]
    return found


def _fully_shard(model, *, frozen: bool):
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kw = {"reshard_after_forward": True} if frozen else {}   # a frozen model's root is never used by a backward
    for block in reversed(_blocks(model)):   # innermost first, as FSDP requires
        fully_shard(block)
    fully_shard(model, **kw)
    model.fdpg_seq_logprobs = types.MethodType(_fdpg_seq_logprobs, model)
    register_fsdp_forward_method(model, "fdpg_seq_logprobs")
    return model


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class Parallel:
    """How one trainer's models run: ``strategy`` "ddp" or "fsdp" inside a process group, "none" otherwise.

    :meth:`wrap` prepares the models in place (before the optimizer is built: FSDP replaces the parameters);
    the rest are the operations whose distributed form differs: scoring, gathering per-sequence scalars, gradient
    accumulation, full state dicts, writing on rank 0.
    """

    def __init__(self, strategy: str = "ddp", device: torch.device | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.strategy = strategy if is_initialized() else "none"
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        self.device = device
        self.policy = self.prior = None
        self._ddp = None

    def __repr__(self) -> str:
        return f"Parallel({self.strategy!r}, rank {self.rank} of {self.world})"

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    # -- models

    def wrap(self, policy, prior, frozen=()) -> None:
        """DDP over the policy's scoring module, or FSDP2 on policy, prior and the other frozen models (in place).
        The prior and ``frozen`` models must not require grad."""
        self.policy, self.prior = policy, prior
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
            # DDP broadcasts rank 0's parameters: every rank starts from the same policy
            import inspect

            # no buffer sync before each forward (a causal LM's buffers are constants); torch < 2.13 spells it
            # broadcast_buffers
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else "broadcast_buffers")
            self._ddp = DDP(_Scorer(policy), device_ids=ids, **{sync: False})
        elif self.strategy == "fsdp":
            _fully_shard(policy, frozen=False)
            for m in (prior, *frozen):
                if m is not None:
                    _fully_shard(m, frozen=True)
                    with torch.no_grad():      # FSDP's all-gather buffers: ordinary tensors, not inference ones
                        m(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        barrier()

    def all_done(self, local: bool) -> bool:
        """Whether every rank's batch has ended (``local``: this rank's), agreed by all ranks (a collective)."""
        if not self.distributed:
            return local
        return int(all_reduce_sum(torch.tensor(0 if local else 1, device=self.device))) == 0

    def score(self, inp, tokens, mask, *, fused: bool, grad: bool, policy_logits=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log pi(x), log a(x))`` ``[B]`` float32 of the continuations: one forward pass of each model (the
        prior in inference mode), the policy's through DDP or FSDP so that its gradient is synchronised.
        ``policy_logits``: the policy's logits when at hand (one process only; see ``score_sequences``)."""
        from .models import score_sequences

        if self.strategy == "none":
            return score_sequences(self.policy, self.prior, inp, tokens, mask, fused=fused, policy_grad=grad,
                                   policy_logits=policy_logits)
        if policy_logits is not None:
            raise ValueError("policy_logits: the policy's pass must go through DDP/FSDP (not given with a strategy)")
        args = (inp.input_ids, inp.attention_mask, inp.position_ids, inp.P, tokens, mask)
        grad_ctx = torch.enable_grad() if grad else torch.no_grad()
        if fused:
            with grad_ctx:
                if self.strategy == "fsdp":
                    lpi = self.policy.fdpg_seq_logprobs(*args)
                elif grad:
                    lpi = self._ddp(*args, fused=True)
                else:
                    lpi = _seq_logprobs_fused(self.policy, *args)
            with torch.inference_mode():
                la = (self.prior.fdpg_seq_logprobs(*args) if self.strategy == "fsdp"
                      else _seq_logprobs_fused(self.prior, *args))
            return lpi, la.clone()
        sl = slice(inp.P - 1, inp.P + tokens.shape[1] - 1)
        kw = dict(input_ids=inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids,
                  use_cache=False)
        with grad_ctx:
            z_pi = (self._ddp(*args, fused=False) if self.strategy == "ddp" and grad
                    else self.policy(**kw).logits)[:, sl]
        with torch.inference_mode():
            z_a = self.prior(**kw).logits[:, sl]
        with grad_ctx:
            st = fdpg.paired_token_stats(z_pi, z_a, tokens, mask=mask, validate=False)
        return st.policy_seq, st.prior_seq

    @contextlib.contextmanager
    def accumulate(self, sync: bool):
        """Around one micro-batch's forward and backward: under DDP, gradients are all-reduced only when
        ``sync`` (the last micro-batch of a step). FSDP reduce-scatters every micro-batch (its unsharded gradients
        would otherwise stay in memory)."""
        if self.strategy == "ddp" and not sync:
            with self._ddp.no_sync():
                yield
        else:
            yield

    # -- global statistics

    def gather(self, *tensors: torch.Tensor | None):
        """Each ``[n, ...]`` tensor (``n`` equal on every rank) concatenated over ranks in rank order, in one
        all-gather for the 1-D ones (packed as float64: exact for float32 values and integer ids below 2**53).
        None stays None. Returns a tuple (or the one tensor)."""
        if self.world == 1:
            return tensors if len(tensors) != 1 else tensors[0]
        flat = [i for i, t in enumerate(tensors) if t is not None and t.dim() == 1]
        out = list(tensors)
        if flat:
            packed = torch.stack([tensors[i].detach().to(torch.float64) for i in flat], 1)
            g = all_gather_cat(packed)
            for j, i in enumerate(flat):
                out[i] = g[:, j].to(tensors[i].dtype)
        for i, t in enumerate(tensors):
            if t is not None and t.dim() != 1:
                out[i] = all_gather_cat(t.detach())
        return tuple(out) if len(out) != 1 else out[0]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global ``[W n, ...]`` tensor."""
        if self.world == 1:
            return t
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if self.distributed else t

    def broadcast(self, obj):
        return broadcast_object(obj) if self.distributed else obj

    def all_gather_object(self, obj) -> list:
        return all_gather_object(obj) if self.distributed else [obj]

    def barrier(self) -> None:
        if self.distributed:
            barrier()

    # -- state dicts (full, for rank 0 to write; every rank loads)

    def full_state_dict(self, model):
        """A module's full state dict for saving: None (save the module as it is) unless it is sharded by FSDP,
        when it is all-gathered to the CPU of rank 0 (a collective: every rank calls it; the others get {})."""
        if not _is_fsdp(model):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, model, state_dict: dict) -> None:
        """Load a full (unsharded) state dict on every rank; FSDP keeps each rank's shard."""
        if not _is_fsdp(model):
            model.load_state_dict(state_dict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, model, optimizer) -> dict:
        """The optimizer's state for saving (full, keyed by parameter name under FSDP; a collective there)."""
        if not _is_fsdp(model):
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, model, optimizer, state: dict) -> None:
        """Load a saved optimizer state: keyed by parameter index (one process, DDP) or by name (FSDP), into
        either kind of model (the checkpoint of one strategy resumes under the other)."""
        keyed_by_name = any(isinstance(k, str) for k in state.get("state", {}))
        if not (_is_fsdp(model) or keyed_by_name):
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not keyed_by_name:   # indices in the optimizer's order (the policy's trainable parameters): names
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            state = {"state": {names[i]: v for i, v in state["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                      for g in state["param_groups"]]}

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    @staticmethod
    def save_pretrained(model, path: Path, state_dict=None) -> None:
        """``model.save_pretrained(path)`` (rank 0), from ``state_dict`` when given (a gathered FSDP model); the
        saved config names the model's own class, not FSDP's wrapper class."""
        if state_dict is None:
            model.save_pretrained(path)
            return
        model.save_pretrained(path, state_dict=state_dict)
        cfg = Path(path) / "config.json"
        if cfg.exists() and _is_fsdp(model):
            d = json.loads(cfg.read_text())
            base = next(c for c in type(model).__mro__[1:] if not c.__name__.startswith("FSDP"))
            d["architectures"] = [base.__name__]
            cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
