"""Apply parallelism to a model from the outside (the model code knows nothing about it).

Order, as in torchtitan: activation checkpointing, then per-block ``torch.compile``, then FSDP2
(``fully_shard`` on every transformer block, then on the backbone as the root). The backbone is the root
because it is the module whose ``forward`` runs (the objective calls ``model.backbone(...)``); FSDP2's
hooks live on ``forward``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mdlm.modeling import MDLM, ARModel


@dataclass(frozen=True)
class ParallelPlan:
    fsdp: bool = True
    param_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: compute in bf16, keep fp32 masters
    reduce_dtype: torch.dtype | None = torch.float32
    activation_checkpointing: bool = False
    compile: bool = False
    reshard_after_forward: bool = True
    shard_blocks: bool = True  # a unit per block (overlap, memory: GPU) or the root alone (fewest collectives)


def enable_activation_checkpointing(block: nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass instead of storing them.

    The block's ``forward`` is wrapped in place, so parameter names (and checkpoints) do not change.
    """
    inner = block.forward

    def forward(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    block.forward = forward


def parallelize(model: MDLM | ARModel, plan: ParallelPlan, mesh=None) -> MDLM | ARModel:
    """Apply ``plan`` in place and return the model. FSDP2 needs an initialised process group."""
    blocks = model.backbone.blocks
    if plan.activation_checkpointing:
        for block in blocks:
            enable_activation_checkpointing(block)
    if plan.compile:
        for block in blocks:
            block.compile()
        # The output layer is memory-bound element-wise work outside the blocks: compiled, it fuses. (The loss
        # over the vocabulary is compiled by the objective: ``objective.compiled()``.)
        model.backbone.final.compile()
    if plan.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if model.backbone.final.linear.out_features != model.config.vocab_size:
            # Padded output columns are cut off by a slice, so the root returns a view; every consumer of the
            # logits reads them out of place (float(), log_softmax), which is what FSDP2's warning asks for.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        policy = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
        for i, block in enumerate(blocks if plan.shard_blocks else ()):
            # The last block's parameters are needed again at once by the backward pass: keep them.
            reshard = plan.reshard_after_forward and i < len(blocks) - 1
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model.backbone, mesh=mesh, mp_policy=policy, reshard_after_forward=plan.reshard_after_forward)
    return model


def reshard(model: nn.Module) -> None:
    """Return every FSDP2 module to its sharded state (an eval forward can leave some unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
