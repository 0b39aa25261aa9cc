"""``pruned`` and ``pruned-unstructured``: two ways to remove half of a denoiser's weights.

* ``pruned`` (structured; ``sd-pruned``): half of the channels of every prunable layer group are removed with
  torch-pruning (magnitude importance, the same ratio in every group), so every convolution and
  linear layer really is smaller, then the pruned network is fine-tuned back towards the teacher
  (``un0-bench train sd-pruned``). Halving both the input and output channels of a convolution
  divides its multiply-adds by four: the counter sees 0.26x the FLOPs of ``sd``. The clock sees
  less (about 0.5x on a CPU): kernels this small are bound by per-op overhead as much as by
  arithmetic.
* ``pruned-unstructured`` (``sd-pruned-unstructured``, any backbone): the smallest-magnitude half
  of every convolution and linear weight is
  set to zero, and the network still runs dense kernels. It does exactly the work of ``sd``: the
  zeros are multiplied like any other number. It is here to show, with numbers, that sparsity saves
  nothing unless a kernel skips it. No training: it is derived from the teacher when built.

The pruned architecture is not ``UNET_CONFIG``. The shipped checkpoint's config records the base
config and the pruning recipe; :func:`load_pruned` rebuilds the exact architecture by re-running
the pruning on a freshly built base network (with ratio-per-group pruning, the resulting shapes
depend only on the architecture and the recipe, not on the weights) and then loads the fine-tuned
weights, refusing any shape that does not match.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.digits import WEIGHTS_DIR, load_data
from un0_bench.backbones.hf import diffusers_class
from un0_bench.harness.backbone import Backbone
from un0_bench.harness.checkpoints import check_checkpoint, file_sha256, load_checkpoint, save_checkpoint
from un0_bench.harness.errors import CheckpointError, StackError
from un0_bench.harness.model import Layer, Model, Plan
from un0_bench.harness.spec import Param
from un0_bench.harness.technique import Technique
from un0_bench.harness.training import ema_update, metered_training, one_cycle, run_steps, training_metadata

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

PRUNED_FILE = WEIGHTS_DIR / "sd-pruned.safetensors"

#: Fine-tuning of the pruned teacher (the shipped run).
# Loss: distil_weight * MSE(student eps, teacher eps) + (1 - distil_weight) * MSE(student eps, noise),
# both on the same noised training digit. Pure distillation (weight 1) is the shipped choice: the
# teacher's prediction is a lower-variance target than the drawn noise, and in a 1,000-step trial
# it reached FID 0.239 / accuracy 0.969 against 0.244 / 0.968 for the 50/50 mix (sd: 0.207 / 0.988).
FINETUNE_DEFAULTS: dict[str, Any] = {"steps": 1000, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.99,
                                     "distil_weight": 1.0, "seed": 0}


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
    Attention = diffusers_class("Attention")
    Downsample2D = diffusers_class("Downsample2D")
    Upsample2D = diffusers_class("Upsample2D")

    if pruning["global_pruning"] or pruning["round_to"] is not None or pruning["ignored"] != ["conv_out"]:
        raise ValueError(f"only the documented recipe is implemented, got {pruning}")
    ratio = pruning["ratio"]
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    heads: dict[torch.nn.Module, int] = {}
    for m in unet.modules():
        if isinstance(m, Attention):
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
        if isinstance(m, (Downsample2D, Upsample2D)):
            m.channels = m.conv.in_channels
            m.out_channels = m.conv.out_channels
    for m in unet.modules():
        if isinstance(m, torch.nn.GroupNorm) and m.num_channels % m.num_groups:
            raise RuntimeError(f"pruning left a GroupNorm with {m.num_channels} channels in {m.num_groups} groups")
    return unet.train(was_training)


def pruned_architecture(base_config: dict[str, Any], pruning: dict[str, Any] = PRUNING) -> torch.nn.Module:
    """A network with the shapes :func:`prune_channels` gives ``base_config`` (weights meaningless)."""
    return prune_channels(diffusers_class("UNet2DModel")(**copy.deepcopy(base_config)), pruning)


def load_pruned(path: Path = PRUNED_FILE, base_config: dict[str, Any] | None = None,
                pruning: dict[str, Any] = PRUNING) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fine-tuned pruned network in eval mode, with its metadata.

    Refuses a file whose recorded config (base config + pruning recipe) is not the expected one,
    and a file whose tensors do not have the rebuilt architecture's shapes.
    """
    if base_config is None:
        from un0_bench.backbones.teacher import UNET_CONFIG

        base_config = UNET_CONFIG
    state, meta = load_checkpoint(path, expected_config=pruned_config(base_config, pruning))
    unet = pruned_architecture(base_config, pruning)
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
        from un0_bench.backbones.teacher import UNET_CONFIG

        check_checkpoint(backbone.weights("sd-pruned"), expected_config=pruned_config(UNET_CONFIG, PRUNING))
        return [backbone.weights("sd-pruned")]

    def apply(self, model: Model, backbone: Backbone, **params: Any) -> Layer:
        base_parameters = sum(p.numel() for p in model.denoiser.parameters())
        unet, meta = load_pruned(backbone.weights("sd-pruned"))
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


# ---------------------------------------------------------------------------------------------
# Fine-tuning the structured model
# ---------------------------------------------------------------------------------------------


def train_pruned(steps: int | None = None, seed: int | None = None, out: Path | None = None,
                 batch_size: int = FINETUNE_DEFAULTS["batch_size"], lr: float = FINETUNE_DEFAULTS["lr"],
                 distil_weight: float = FINETUNE_DEFAULTS["distil_weight"]) -> dict[str, Any]:
    """Prune the shipped teacher's channels by half, fine-tune, write weights (EMA) and metadata.

    Each step noises a batch of training digits at uniform timesteps and regresses the pruned
    network's noise prediction onto a mix of the teacher's prediction on the same input and the true
    noise (see :data:`FINETUNE_DEFAULTS`).

    Args:
        steps: Fine-tuning steps (default: the shipped run's).
        seed: Seed of the batches, timesteps and noise.
        out: Where to write the weights (default: the shipped file).
        batch_size: Training digits per step.
        lr: Peak learning rate (one-cycle schedule).
        distil_weight: Weight of the teacher-matching term, in [0, 1].

    Returns:
        The metadata written beside the weights.
    """
    from un0_bench.backbones.teacher import TEACHER_FILE, UNET_CONFIG, load_teacher, make_scheduler

    steps = FINETUNE_DEFAULTS["steps"] if steps is None else steps
    seed = FINETUNE_DEFAULTS["seed"] if seed is None else seed
    out = PRUNED_FILE if out is None else Path(out)
    if not 0.0 <= distil_weight <= 1.0:
        raise ValueError(f"distil_weight must be in [0, 1], got {distil_weight}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = load_data()
    x, y = data.train_images, data.train_labels  # (N, 1, 16, 16) in [-1, 1], (N,)
    teacher, teacher_meta = load_teacher()
    scheduler = make_scheduler()
    decay = FINETUNE_DEFAULTS["ema_decay"]

    with metered_training() as energy:
        # Pruning is part of the derivation, so it is metered too (it takes well under a second).
        student = prune_channels(copy.deepcopy(teacher)).train().requires_grad_(True)
        ema = copy.deepcopy(student).requires_grad_(False)
        opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
        sched = one_cycle(opt, lr, steps + 1, 0.05)

        def train_step() -> float:
            idx = torch.randint(0, len(y), (batch_size,), generator=g)
            x0, labels = x[idx], y[idx]  # (B, 1, 16, 16), (B,)
            # The noising of backbones.teacher.diffusion_loss, written out so that the teacher and
            # the student see the same noised input and the student runs once.
            noise = torch.randn(x0.shape, generator=g)  # (B, 1, 16, 16)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
            xt = scheduler.add_noise(x0, noise, t)
            pred = student(xt, t, class_labels=labels).sample  # (B, 1, 16, 16)
            loss = (1.0 - distil_weight) * F.mse_loss(pred, noise)
            if distil_weight > 0:
                with torch.no_grad():
                    target = teacher(xt, t, class_labels=labels).sample  # (B, 1, 16, 16)
                loss = loss + distil_weight * F.mse_loss(pred, target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        losses = run_steps(train_step, steps, "fine-tune sd-pruned", scheduler=sched,
                           after_step=lambda step: ema_update(ema, student, decay))
    # Count one more training step (teacher forward, student forward, backward, optimizer) for the
    # proxy figure. It changes only the raw weights, not the EMA weights that are saved.
    energy.count_proxy(train_step, batch_size, steps)
    energy.add_parent("teacher", teacher_meta)
    meta = training_metadata(
        kind="digits-pruned", config=pruned_config(UNET_CONFIG), energy=energy,
        extra={
            "command": f"un0-bench train sd-pruned --steps {steps} --seed {seed}",
            "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": decay,
                      "distil_weight": distil_weight, "seed": seed},
            "parameters": sum(p.numel() for p in ema.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            # The pruned weights are only valid for this teacher: retrain when it changes.
            "teacher_sha256": file_sha256(TEACHER_FILE),
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "data_sha256": data.sha256,
        },
    )
    save_checkpoint(out, ema.state_dict(), meta)
    return meta
