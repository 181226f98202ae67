"""The Trainer subclass: uint8 images normalised on the device, the contrastive loss, and throughput after skip_steps."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import transformers.trainer as transformers_trainer
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from clip_train.data.dataset import ClipDataset
from clip_train.data.inputs import DataInfo
from clip_train.device.apex_amp import BackendTrainerMixin
from clip_train.device.backend import synchronize
from clip_train.eval.evaluation import RetrievalSkipped, retrieval_eval
from clip_train.eval.zeroshot import ZeroShotSet, ZeroShotSkipped, zeroshot_eval
from clip_train.train.accumulation import ContrastiveAccumulationMixin
from clip_train.train.compiling import allow_static_widths, mark_caption_width, width_policy
from clip_train.train.loss import clip_loss
from clip_train.train.text_mask import full_mask, text_attention_mask

logger = logging.getLogger(__name__)


def normalize_pixels(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], scaled to [0, 1] and normalised with the processor's mean/std.

    Two passes (a transposing copy, then one fused multiply-add in place) instead of four. The result is plain
    contiguous NCHW: on CPU the ViT patch convolution runs ~30% faster on it than on the channels-last view.
    ``out``: a float buffer of that shape to write into.
    """
    x = images.permute(0, 3, 1, 2)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out.copy_(x)
    return torch.addcmul(-mean / std, out, 1.0 / (std * 255.0), out=out)


class ClipTrainer(BackendTrainerMixin, ContrastiveAccumulationMixin, Trainer):
    """Adds to the Trainer: device-side image normalisation, our loss, and the recipe's FPS definition."""

    def __init__(
        self,
        *args: Any,
        image_mean: list[float],
        image_std: list[float],
        skip_steps: int = 0,
        loss_scope: str = "local",
        retrieval: bool = True,
        pad_id: int = 1,
        train_input: DataInfo | None = None,
        zeroshot: ZeroShotSet | None = None,
        **kwargs: Any,
    ) -> None:
        # The train split as data/inputs.get_data gives it: its dataset, and its own loader and progress if it has them.
        self.train_input = train_input
        if train_input is not None:
            kwargs["train_dataset"] = train_input.dataset
        super().__init__(*args, **kwargs)
        self._mean = torch.tensor(image_mean).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std).view(1, 3, 1, 1)
        self.skip_steps = skip_steps
        self.loss_scope = loss_scope
        self.retrieval, self.pad_id = retrieval, pad_id
        # A class folder for zero-shot accuracy at every evaluation (eval/zeroshot.py).
        self.zeroshot = zeroshot
        self._clock: dict[str, float] = {}
        self._pixel_buffer: torch.Tensor | None = None
        # Samples left out of batches on the fly, by phase, this rank: device tensors summed without a host sync.
        self._undecodable: dict[str, Any] = {}
        # The text tower's attention implementation (read at the first batch), and for compiled runs the mask of
        # a batch without padding, per shape.
        self._text_attn: str | None = None
        self._text_tower: torch.nn.Module | None = None
        self._full_masks: dict[tuple, torch.Tensor] = {}
        self._static_widths = (
            self.args.torch_compile and width_policy(self.args.torch_compile_mode) == "static"
        )
        if self._static_widths:
            collator = self.data_collator
            allow_static_widths(getattr(collator, "max_len", 128), getattr(collator, "multiple", 8))
        self.add_callback(_StepClock(self._clock))
        if train_input is not None and train_input.progress is not None:
            self.add_callback(train_input.progress)  # reads the loader's progress back at resume

    # --- input ------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        # Streamed shards split themselves over ranks and workers: accelerate's wrapper would make each rank read all.
        if self.train_input is not None and self.train_input.make_loader is not None:
            return self.train_input.make_loader(self.data_collator, self.args)
        return super().get_train_dataloader()

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # A loader that resumes itself (the shard stream) must not be fast-forwarded by the Trainer, which would
        # rebuild it and read the trained batches again; but the Trainer must still count the resumed epoch's batches
        # as usual, or its last accumulation window never steps (--ignore_data_skip restarts that count at 0). So
        # the Trainer resumes as for any dataset, and its fast-forward hands this loader back unchanged.
        if self.train_input is None or self.train_input.progress is None:
            return super()._run_epoch(*args, **kwargs)
        skip = transformers_trainer.skip_first_batches  # the Trainer's only call of it is in _run_epoch
        transformers_trainer.skip_first_batches = _resumes_itself
        try:
            return super()._run_epoch(*args, **kwargs)
        finally:
            transformers_trainer.skip_first_batches = skip

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        # Here, not in a callback: every checkpoint gets the loader's progress whoever decided the save (steps, clock,
        # pre-emption, best metric), and before on_save, where CheckpointMarker lists the folder's files.
        if self.train_input is not None and self.train_input.progress is not None:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self.train_input.progress.save(folder)

    # --- loss -------------------------------------------------------------------------------------------------
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if self._mean.device != images.device:
            self._mean, self._std = self._mean.to(images.device), self._std.to(images.device)
        if images.device.type != "cpu":
            return normalize_pixels(images, self._mean, self._std)
        # On CPU a fresh 38 MB float batch (64 x 224 x 224 x 3) is mmap-ed and page-faulted in at every step, which
        # costs as much as the normalisation itself: reuse one buffer. Safe because each batch is consumed (its
        # backward done) before the next is normalised; were it not, autograd's version check would raise.
        shape = images.permute(0, 3, 1, 2).shape
        if self._pixel_buffer is None or self._pixel_buffer.shape != shape:
            self._pixel_buffer = torch.empty(shape, dtype=torch.float32)
        return normalize_pixels(images, self._mean, self._std, out=self._pixel_buffer)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        out = self.embed(model, inputs)
        scale = self.accelerator.unwrap_model(model).logit_scale
        # Evaluation keeps the in-batch loss, so eval_loss stays comparable with the recipe's at any world size.
        scope = self.loss_scope if model.training else "local"
        # Item access: under apex O2 the model's outputs come back as a plain dict.
        loss = clip_loss(out["image_embeds"], out["text_embeds"], scale, scope=scope)
        return (loss, out) if return_outputs else loss

    def embed(self, model: torch.nn.Module, inputs: dict) -> Any:
        """The model's outputs for a batch (contrastive accumulation runs it twice per micro-batch)."""
        dropped = inputs.pop("undecodable", None)
        if dropped is not None:
            phase = "train" if model.training else "eval"
            self._undecodable[phase] = self._undecodable.get(phase, 0) + dropped
            if inputs["input_ids"].shape[0] == 0:
                raise RuntimeError(
                    "every image of a batch failed to decode on the fly (see the warnings above): check the data, "
                    "or use the image cache (the default), which leaves undecodable images out before batching"
                )
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=self.text_mask(model, inputs),
            pixel_values=self.pixels(inputs["pixel_values"]),
            return_loss=False,
        )

    def text_mask(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor | None:
        """The batch's attention mask in the 4-D form the text tower uses unchecked (train/text_mask.py): no
        host-device sync in the forward. No mask (nothing padded) stays None in eager runs; compiled runs get an
        all-True mask instead, so a padded and an unpadded batch of one width share a graph."""
        if self._text_attn is None:
            self._text_tower = getattr(self.accelerator.unwrap_model(model), "text_model", None)
            self._text_attn = (
                getattr(getattr(self._text_tower, "config", None), "_attn_implementation", None) or ""
            )
        # The weights' dtype now: apex O2 casts them to fp16 after the trainer is made.
        dtype = next(self._text_tower.parameters()).dtype if self._text_tower is not None else torch.float32
        mask = text_attention_mask(inputs.get("attention_mask"), self._text_attn, dtype)
        ids = inputs["input_ids"]
        if mask is None and self.args.torch_compile:
            key = (*ids.shape, ids.device, dtype)
            if key not in self._full_masks:
                self._full_masks[key] = full_mask(*ids.shape, self._text_attn, ids.device, dtype)
            mask = self._full_masks[key]
        if self.args.torch_compile:
            mark_caption_width({"input_ids": ids, "attention_mask": mask}, static=self._static_widths)
        return mask

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict, prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        # Evaluation needs only the loss: keeping every batch's logits (the Trainer's default) costs memory for nothing.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict:
        """Eval loss and retrieval when there is an eval split, then zero-shot accuracy when a class folder was given."""
        has_split = eval_dataset is not None or self.eval_dataset is not None
        metrics = self._loss_and_retrieval(eval_dataset, ignore_keys, metric_key_prefix) if has_split else {}
        if self.zeroshot is not None:
            metrics.update(self.zeroshot_metrics(metric_key_prefix))
        return metrics

    def zeroshot_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Top-1/top-5 on the class folder, logged (every rank calls it); {} with an error line if the model diverged."""
        start = time.perf_counter()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                found = zeroshot_eval(
                    self.model, self.zeroshot, pad_id=self.pad_id, batch_size=self.args.per_device_eval_batch_size,
                    device=self.args.device, rank=self.args.process_index, world=self.args.world_size,
                    pixels=self.pixels,
                )  # fmt: skip
        except ZeroShotSkipped as e:
            logger.error("zero-shot metrics skipped at step %d: %s", self.state.global_step, e)
            return {}
        found = {f"{prefix}_{k}": round(v, 4) for k, v in found.items()}
        found[f"{prefix}_zeroshot_runtime"] = round(time.perf_counter() - start, 3)
        self.log(found)
        return found

    def _loss_and_retrieval(self, eval_dataset: Any, ignore_keys: Any, metric_key_prefix: str) -> dict:
        """The in-batch eval loss (as the recipe), then retrieval recall over the whole validation split.

        A model whose embeddings are NaN (diverged) gets an error in the log and no recall metrics, but the
        run goes on: a long training run is not lost at an evaluation.
        """
        self._undecodable["eval"] = 0  # counts this evaluation's batches only
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not self.retrieval or ds is None or isinstance(ds, dict) or not len(ds):
            return metrics  # (a dict of eval sets: super() called evaluate on each)
        if not isinstance(ds, ClipDataset):
            logger.warning(
                "retrieval metrics need run_clip's ClipDataset, got %s: skipped", type(ds).__name__
            )
            return metrics
        start = time.perf_counter()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                found = retrieval_eval(
                    self.model, ds, pad_id=self.pad_id, batch_size=self.args.per_device_eval_batch_size,
                    device=self.args.device, rank=self.args.process_index, world=self.args.world_size,
                    pixels=self.pixels,
                )  # fmt: skip
        except RetrievalSkipped as e:
            logger.error("retrieval metrics skipped at step %d: %s", self.state.global_step, e)
            return metrics
        found = {f"{metric_key_prefix}_{k}": round(v, 4) for k, v in found.items()}
        found[f"{metric_key_prefix}_retrieval_runtime"] = round(time.perf_counter() - start, 3)
        self.log(found)
        metrics.update(found)
        return metrics

    def undecodable(self, phase: str, prefix: str) -> dict[str, int]:
        """Samples whose image failed to decode on the fly and were left out of their batch (every rank, every time
        one was drawn), as ``{prefix}_skipped_undecodable_samples``; empty when there were none. Collective: every
        rank calls it."""
        counts = {"undecodable_samples": self._undecodable.get(phase, 0)}
        if phase == "train" and self.train_input is not None and self.train_input.skip_counts is not None:
            counts.update(self.train_input.skip_counts())  # streamed shards' skips, this rank
        # The undecodable count may be a device tensor (summed without a per-step sync): stack, do not rebuild.
        values = torch.stack(
            [torch.as_tensor(v, device=self.args.device).reshape(()) for v in counts.values()]
        )
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
        return {f"{prefix}_skipped_{k}": int(v) for k, v in zip(counts, values.tolist(), strict=True) if v}

    # --- throughput -------------------------------------------------------------------------------------------
    def training_step(
        self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        steps_done = self.state.global_step - self._clock.setdefault("first_step", self.state.global_step)
        if steps_done == self.skip_steps and "t0" not in self._clock:
            synchronize(self.args.device)
            self._clock["t0"], self._clock["t0_step"] = time.perf_counter(), self.state.global_step
        self._clock.setdefault("last_t", time.perf_counter())
        self._clock.setdefault("last_step", self.state.global_step)
        return super().training_step(model, inputs, num_items_in_batch)

    def global_batch(self) -> int:
        return (
            self.args.per_device_train_batch_size
            * self.args.world_size
            * self.args.gradient_accumulation_steps
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Per-interval throughput for the plots; the figure users compare is train_samples_per_second below.
        if "loss" in logs and "last_t" in self._clock:
            now = time.perf_counter()
            steps = self.state.global_step - self._clock["last_step"]
            if steps > 0 and now > self._clock["last_t"]:
                logs["train_step_samples_per_second"] = round(
                    steps * self.global_batch() / (now - self._clock["last_t"]), 3
                )
            self._clock["last_t"], self._clock["last_step"] = now, self.state.global_step
        super().log(logs, start_time)

    def throughput_metrics(self) -> dict[str, float]:
        """train_samples_per_second as the recipe defines it: global samples/s after the first skip_steps steps.

        All zero when this run trained no step past skip_steps (a finished run resumed, or a run shorter than
        skip_steps): the Trainer's own figure is then a division of a nominal sample count by start-up time,
        and a zero also replaces a previous run's figures in all_results.json, which the Trainer merges into.
        """
        timed = "t0" in self._clock and self._clock.get("end_step", 0) > self._clock["t0_step"]
        steps = self._clock["end_step"] - self._clock["t0_step"] if timed else 0
        seconds = self._clock["end_t"] - self._clock["t0"] if timed else 1.0
        fps = steps * self.global_batch() / seconds
        return {
            "train_samples_per_second": round(fps, 3),
            "train_samples_per_second_per_device": round(fps / self.args.world_size, 3),
            "train_steps_per_second": round(steps / seconds, 3),
            "train_timed_steps": int(steps),
        }


def _resumes_itself(loader: Any, num_batches: int = 0) -> Any:
    """The Trainer's fast-forward for a loader that resumes itself: nothing to skip."""
    return loader


class _StepClock(TrainerCallback):
    """Stamps the end of every optimizer step (synchronising only at the last one, to keep steps asynchronous)."""

    def __init__(self, clock: dict[str, float]) -> None:
        self.clock = clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            synchronize(args.device)
        self.clock["end_t"], self.clock["end_step"] = time.perf_counter(), state.global_step
