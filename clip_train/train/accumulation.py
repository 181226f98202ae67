"""Gradient accumulation that keeps the contrastive negatives (gradient caching, Gao et al. 2021).

The Trainer's accumulation averages K in-batch losses: each micro-batch is scored only against itself. Here the K
micro-batches of one optimizer step are scored as one batch of K x B (x world with --loss_scope global), with the
activation memory of one micro-batch:

1. embed every micro-batch without a graph, saving the RNG state (CPU and device) before each;
2. take the big-batch loss and its gradients with respect to the embeddings and the logit scale;
3. run each micro-batch again with a graph, under its saved RNG state (the same dropout masks), and
   back-propagate its slice of those gradients; DDP reduces only on the last one (no_sync before).

Loss and gradients equal those of one big batch (the cost: one extra forward pass per micro-batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from clip_train.train.loss import clip_loss

ACCUMULATION_MODES = ("contrastive", "mean")

# (model, inputs) -> the model's outputs, holding image_embeds and text_embeds
Embed = Callable[[torch.nn.Module, dict], Any]


def describe(mode: str, steps: int, batch: int, world: int, scope: str) -> str:
    """The start-up line for --gradient_accumulation_steps > 1."""
    if mode == "mean":
        return (
            f"gradient accumulation: mean of {steps} in-batch losses of {batch} samples each "
            "(--accumulation_mode mean: each micro-batch is scored only against itself)"
        )
    scored = steps * batch * (world if scope == "global" else 1)
    return (
        f"gradient accumulation: contrastive over {steps} micro-batches of {batch}: each step scores "
        f"{scored} samples against each other, as one batch of {scored} would (one extra forward pass per "
        "micro-batch; --accumulation_mode mean for the Trainer's mean of in-batch losses)"
    )


# --- RNG replay -------------------------------------------------------------------------------------------------
def _device_rng(device: torch.device) -> Any:
    """torch.cuda / torch.npu (whichever module owns the device's generator), or None on CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state and the device's (dropout draws from the device's on an accelerator)."""
    module = _device_rng(device)
    return torch.get_rng_state(), None if module is None else module.get_rng_state(device)


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        _device_rng(device).set_rng_state(state[1], device)


@contextlib.contextmanager
def replaying(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Run the block from ``state``, then put the generators back where they were (the stream goes on from the
    first pass, so a run stays deterministic from its seed and from a resumed checkpoint's RNG files)."""
    now = rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(now, device)


# --- the step ---------------------------------------------------------------------------------------------------
def _device_of(batch: dict) -> torch.device:
    return next(v.device for v in batch.values() if isinstance(v, Tensor))


def grad_cache_step(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    embed: Embed,
    logit_scale: Tensor,
    scope: str = "local",
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """Accumulate into the parameters' .grad the gradients of the contrastive loss of all ``micro_batches`` as one
    batch; return that loss (detached).

    embed: the model's forward for one micro-batch (outputs with "image_embeds" and "text_embeds").
    logit_scale: the model's parameter (the unwrapped module's). backward: how a loss is back-propagated (the
    accelerator's, so a GradScaler or apex's scale_loss scales it). no_sync: DDP's context that holds the gradient
    all-reduce, entered for every micro-batch but the last.
    """
    device = _device_of(micro_batches[0])
    states, images, texts = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(rng_state(device))
            out = embed(model, batch)
            images.append(out["image_embeds"])
            texts.append(out["text_embeds"])

    # The big-batch loss in fp32 on leaves: its gradients are exact and unscaled here; the backward of each replay
    # goes through ``backward``, which applies the loss scale where there is one.
    all_images = torch.cat(images).float().requires_grad_()
    all_texts = torch.cat(texts).float().requires_grad_()
    scale = logit_scale.detach().float().requires_grad_(logit_scale.requires_grad)
    loss = clip_loss(all_images, all_texts, scale, scope=scope)
    leaves = [all_images, all_texts] + ([scale] if scale.requires_grad else [])
    grads = torch.autograd.grad(loss, leaves)
    sizes = [len(x) for x in images]
    image_grads, text_grads = grads[0].split(sizes), grads[1].split(sizes)
    del images, texts, all_images, all_texts

    last = len(micro_batches) - 1
    for k, batch in enumerate(micro_batches):
        with no_sync() if k < last else contextlib.nullcontext(), replaying(states[k], device):
            out = embed(model, batch)
            # A surrogate whose gradient with respect to the embeddings is the cached one.
            terms = [
                (emb.float() * grad).sum()
                for emb, grad in ((out["image_embeds"], image_grads[k]), (out["text_embeds"], text_grads[k]))
                if emb.requires_grad
            ]
            if k == last and scale.requires_grad:
                terms.append((logit_scale.float() * grads[2]).sum())
            if terms:  # nothing to train (every part frozen) gives no graph at all
                backward(torch.stack(terms).sum())
            del out, terms
    return loss.detach()


class ContrastiveAccumulationMixin:
    """Trainer mixin: with gradient_accumulation_steps > 1 and mode "contrastive", training_step buffers the
    micro-batches of an optimizer step and, at the last, runs ``grad_cache_step`` on them all.

    The Trainer fetches the K micro-batches of a step together and calls training_step on each, under DDP's
    no_sync for all but the last. The buffered calls do no work and return a zero loss; the last returns the
    big-batch loss, so the logged loss is that loss. A step with one micro-batch (K = 1, or the last step of an
    epoch that does not divide by K) takes the Trainer's own path unchanged. The host class provides
    ``embed(model, inputs)`` and ``loss_scope``.
    """

    def __init__(self, *args: Any, accumulation_mode: str = "contrastive", **kwargs: Any) -> None:
        if accumulation_mode not in ACCUMULATION_MODES:
            raise ValueError(
                f"accumulation mode must be one of {ACCUMULATION_MODES}, got {accumulation_mode!r} "
                "(--accumulation_mode contrastive|mean)"
            )
        self.accumulation_mode = accumulation_mode
        self._micro_batches: list[dict] = []
        self._micro_batches_step = -1
        super().__init__(*args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None) -> Tensor:
        group = getattr(self, "current_gradient_accumulation_steps", 1)
        if self.accumulation_mode != "contrastive" or group <= 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._micro_batches_step != self.state.global_step:
            self._micro_batches = []  # left by a step the Trainer broke off (should_training_stop mid-step)
        self._micro_batches_step = self.state.global_step
        self._micro_batches.append(self._prepare_inputs(inputs))
        if len(self._micro_batches) < group:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers, as the Trainer does
            self.optimizer.train()

        def embed(model: torch.nn.Module, batch: dict) -> Any:
            with self.compute_loss_context_manager():
                return self.embed(model, batch)

        return grad_cache_step(
            model,
            batches,
            embed,
            self.accelerator.unwrap_model(model).logit_scale,
            scope=self.loss_scope,
            backward=self.accelerator.backward,
            no_sync=lambda: self.accelerator.no_sync(model),
        )
