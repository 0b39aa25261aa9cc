"""``pruned`` and ``pruned-unstructured``: two ways to remove half of a denoiser's weights.

* ``pruned`` (structured; ``sd-pruned``): half of the channels of every prunable layer group are removed with
  torch-pruning (magnitude importance, the same ratio in every group), so every convolution and
  linear layer really is smaller, then the pruned network is fine-tuned back towards the teacher
  (``un0-bench train sd-pruned``, ``training/pruned.py``). Halving both the input and output channels of a convolution
  divides its multiply-adds by four: the counter sees 0.26x the FLOPs of ``sd``. The clock sees
  less (about 0.5x on a CPU): kernels this small are bound by per-op overhead as much as by
  arithmetic.
* ``pruned-unstructured`` (``sd-pruned-unstructured``, any backbone): the smallest-magnitude half
  of every convolution and linear weight is
  set to zero, and the network still runs dense kernels. It does exactly the work of ``sd``: the
  zeros are multiplied like any other number. It is here to show, with numbers, that sparsity saves
  nothing unless a kernel skips it. No training: it is derived from the teacher when built.

The pruned architecture is not the teacher's. The shipped checkpoint's config records the base
config (the backbone's :meth:`~un0_bench.harness.core.backbone.Backbone.denoiser_config`) and the pruning
recipe; :func:`load_pruned` rebuilds the exact architecture by re-running the pruning on the base
denoiser it is given (with ratio-per-group pruning, the resulting shapes depend only on the
architecture and the recipe, not on the weights) and then loads the fine-tuned weights, refusing
any shape that does not match. The fine-tuning is ``training/pruned.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Plan
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import CheckpointError, StackError
from un0_bench.harness.weights.checkpoints import check_checkpoint, load_checkpoint

#: Structured pruning recipe. Part of the checkpoint's config: the architecture is rebuilt from it.
PRUNING: dict[str, Any] = {
    "method": "torch-pruning MetaPruner",
    "importance": "magnitude (L2 norm of each channel group)",
    "ratio": 0.5,
    "global_pruning": False,  # the same ratio in every group, so the shapes do not depend on weights
    "round_to": None,
    "attention": "head dimensions pruned alike in every head; head count kept",
    "ignored": ["conv_out"],  # the network must still predict one noise channel
}

#: Unstructured pruning: the fraction of each convolution and linear weight set to zero.
UNSTRUCTURED_RATIO = 0.5

# ---------------------------------------------------------------------------------------------
# Structured pruning
# ---------------------------------------------------------------------------------------------


def pruned_config(base_config: dict[str, Any], pruning: dict[str, Any] = PRUNING) -> dict[str, Any]:
    """The config a pruned checkpoint records: the base ``UNet2DModel`` config plus the recipe.

    Normalised through JSON (tuples become lists), so it compares equal to what a metadata file holds.
    """
    return json.loads(json.dumps({"base": base_config, "pruning": pruning}))


def _example_inputs(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = unet.config
    inputs = {"sample": torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size),  # (1, C, H, W)
              "timestep": torch.tensor([500])}
    if cfg.num_class_embeds is not None:
        inputs["class_labels"] = torch.tensor([0])
    return inputs


def prune_channels(unet: torch.nn.Module, pruning: dict[str, Any] = PRUNING) -> torch.nn.Module:
    """Remove ``pruning["ratio"]`` of the channels of ``unet`` (a diffusers ``UNet2DModel``), in place.

    torch-pruning traces the network and prunes coupled layers together: a convolution's output
    channels with the GroupNorm, time-embedding projection and next convolution that read them,
    skip connections with both ends of the concatenation, and an attention block's query, key,
    value and output projections (head dimensions pruned alike in each head, so the head count and
    the reshape into heads stay valid). GroupNorm channels are pruned group-aligned (the same
    positions in every group), so ``num_groups`` still divides the channel count. The time and
    class embeddings (width 128 in the teacher) are pruned with the projections that read them.

    Args:
        unet: The network to prune; its weights decide which channels go (smallest L2 norm).
        pruning: The recipe (see :data:`PRUNING`); only the documented recipe is implemented.

    Returns:
        ``unet``, pruned.
    """
    import torch_pruning as tp

    if pruning["global_pruning"] or pruning["round_to"] is not None or pruning["ignored"] != ["conv_out"]:
        raise ValueError(f"only the documented recipe is implemented, got {pruning}")
    ratio = pruning["ratio"]
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    heads: dict[torch.nn.Module, int] = {}
    for m in unet.modules():
        if _is_a(m, "Attention"):
            heads.update({m.to_q: m.heads, m.to_k: m.heads, m.to_v: m.heads})
    was_training = unet.training
    # torch-pruning finds the coupled layers through the autograd graph of a traced forward: with
    # frozen weights (a loaded teacher) it would find nothing and prune nothing.
    frozen = {name for name, p in unet.named_parameters() if not p.requires_grad}
    unet.requires_grad_(True)
    parameters_before = sum(p.numel() for p in unet.parameters())
    pruner = tp.pruner.MetaPruner(
        unet.eval(), example_inputs=_example_inputs(unet), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=False, round_to=None, ignored_layers=[unet.conv_out],
        num_heads=heads, prune_num_heads=False, prune_head_dims=True,
        output_transform=lambda out: out.sample,
    )
    with torch.no_grad():
        pruner.step()
    for name, p in unet.named_parameters():
        p.requires_grad_(name not in frozen)
    if sum(p.numel() for p in unet.parameters()) >= parameters_before:
        raise RuntimeError("torch-pruning removed no channels (was the traced forward's graph empty?)")
    # diffusers' resamplers assert the input's channel count against these attributes.
    for m in unet.modules():
        if _is_a(m, "Downsample2D") or _is_a(m, "Upsample2D"):
            m.channels = m.conv.in_channels
            m.out_channels = m.conv.out_channels
    for m in unet.modules():
        if isinstance(m, torch.nn.GroupNorm) and m.num_channels % m.num_groups:
            raise RuntimeError(f"pruning left a GroupNorm with {m.num_channels} channels in {m.num_groups} groups")
    return unet.train(was_training)


def _is_a(module: torch.nn.Module, class_name: str) -> bool:
    """``isinstance`` by class name (diffusers' blocks are known by name; the technique does not import diffusers)."""
    return any(c.__name__ == class_name for c in type(module).__mro__)


def load_pruned(path: Path, base: torch.nn.Module, base_config: dict[str, Any],
                pruning: dict[str, Any] = PRUNING) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fine-tuned pruned network in eval mode, with its metadata.

    ``base`` is a denoiser built from ``base_config`` (the teacher); it is pruned in place to the
    recorded architecture, whatever its weights, and then gets the file's weights. Refuses a file
    whose recorded config (base config + pruning recipe) is not the expected one, and a file whose
    tensors do not have the rebuilt architecture's shapes.
    """
    state, meta = load_checkpoint(path, expected_config=pruned_config(base_config, pruning))
    unet = prune_channels(base, pruning)
    expected = unet.state_dict()
    wrong = [f"{k}: model {tuple(v.shape)}, file {tuple(state[k].shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or extra:
        raise CheckpointError(f"{path}: tensors do not fit the pruned architecture (shape mismatches: "
                              f"{wrong[:3]}; missing: {missing[:3]}; unexpected: {extra[:3]})")
    unet.load_state_dict(state)
    return unet.eval().requires_grad_(False), meta


class ChannelPruning(Technique):
    """``pruned`` (``sd-pruned``): the shipped 50% channel-pruned network, fine-tuned from the teacher."""

    name = "pruned"
    stacking = "right after sd (its weights are fine-tuned from the teacher)"
    denoisers = ("UNet2DModel",)

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        self.require_first(plan, "replaces the denoiser with shipped weights fine-tuned from the teacher")
        plan.weights = "sd-pruned"

    def check_weights(self, backbone: Backbone, **params: Any) -> list[Path]:
        check_checkpoint(backbone.weights("sd-pruned"), expected_config=pruned_config(backbone.denoiser_config()))
        return [backbone.weights("sd-pruned")]

    def apply(self, model: Model, backbone: Backbone, **params: Any) -> Layer:
        base_parameters = sum(p.numel() for p in model.denoiser.parameters())
        unet, meta = load_pruned(backbone.weights("sd-pruned"), model.denoiser, backbone.denoiser_config())
        model.denoiser, model.derivation = unet, meta
        parameters = sum(p.numel() for p in unet.parameters())
        return Layer(self.name, params, {
            "pruning": {k: PRUNING[k] for k in ("method", "importance", "ratio", "attention")},
            "kernels": "dense, on smaller tensors",
            "parameters_vs_teacher": parameters / base_parameters,
            # NB: unet.config still describes the unpruned network; the real widths are the layers'.
            "block_out_channels": [block.resnets[-1].conv2.out_channels for block in unet.down_blocks],
            "time_embedding_channels": unet.time_embedding.linear_2.out_features,
        })


# ---------------------------------------------------------------------------------------------
# Unstructured pruning
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_prune_(unet: torch.nn.Module, ratio: float = UNSTRUCTURED_RATIO) -> dict[str, float]:
    """Zero the ``ratio`` smallest-magnitude entries of every Conv2d and Linear weight, in place.

    The one magnitude pruning of the project (the pipeline copy rounded ``ratio * numel`` and broke
    ties by ``topk``, which is not deterministic on ties; this one floors and breaks ties by position).

    Each layer loses exactly ``floor(ratio * numel)`` entries (ties broken by position, so the result
    is deterministic). Biases, norms and embeddings are left alone.

    Returns:
        The fraction of zero weights in each pruned layer, by module path.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"unstructured pruning ratio must be in [0, 1), got {ratio}")
    sparsity = {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.view(-1)
            k = int(ratio * w.numel())
            w[torch.argsort(w.abs().float(), stable=True)[:k]] = 0.0
            sparsity[name] = float((w == 0).sum()) / w.numel()
    return sparsity


def weight_sparsity(unet: torch.nn.Module) -> float:
    """Fraction of zeros among all Conv2d and Linear weights."""
    ws = [m.weight for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


SPARSITY = Param(float, UNSTRUCTURED_RATIO, "fraction of each Conv2d/Linear weight set to zero", low=0.0, high=1.0)


class MagnitudePruning(Technique):
    """``pruned-unstructured`` / ``pruned-unstructured:sparsity=0.3``: magnitude pruning, dense kernels."""

    name = "pruned-unstructured"
    params = {"sparsity": SPARSITY}

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        if not params["sparsity"] < 1.0:
            raise StackError(f"pruned-unstructured: sparsity={params['sparsity']:g} would zero every weight; "
                             "sparsity must be in [0, 1)")

    def apply(self, model: Model, backbone: Backbone, sparsity: float = UNSTRUCTURED_RATIO) -> Layer:
        per_layer = magnitude_prune_(model.denoiser, sparsity)
        return Layer(self.name, {"sparsity": sparsity}, {
            "pruning": {"method": "per-layer magnitude (smallest |w| set to zero, ties by position)",
                        "ratio": sparsity, "layers": "every Conv2d and Linear weight"},
            "pruned_layers": len(per_layer),
            "weight_sparsity": weight_sparsity(model.denoiser),
            # NB: the counter charges ops by their shapes, so multiplications by zero are counted, as
            # they are executed: a dense kernel does not skip them.
            "kernels": "dense (zeros are multiplied, so FLOPs and energy do not drop)",
            "derivation": "no training: zeroing weights takes milliseconds, so the derivation is the base's",
        })
