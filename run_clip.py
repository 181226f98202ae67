#!/usr/bin/env python3
"""Train a CLIP-like dual encoder (clip-roberta) on COCO 2017 captions with the HF Trainer.

The port of transformers' examples/pytorch/contrastive-image-text/run_clip.py used by the Ascend ModelZoo
CLIP_for_PyTorch recipe. It reads top to bottom like the example; everything else lives in clip_train/.
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import torch
import transformers
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    VisionTextDualEncoderProcessor,
    set_seed,
)

from clip_train import model as model_parts
from clip_train.checkpoint import finishing
from clip_train.checkpoint import output_dir as outputs
from clip_train.checkpoint import saving as checkpointing
from clip_train.checkpoint.preemption import Preempted, PreemptionHandler
from clip_train.config.args import device_id_given, parse_args
from clip_train.config.settle import settle
from clip_train.data import dataset as data
from clip_train.data import feeding, images
from clip_train.data.inputs import check_data, get_data
from clip_train.device import backend, memory
from clip_train.device.families import pin_card
from clip_train.errors import ArgumentError, DataError, SetupError, TrainingDiverged, says_errors
from clip_train.eval import model_card, zeroshot
from clip_train.eval.plots import save_plots
from clip_train.eval.recipe_log import recipe_blocks
from clip_train.launch.worker import note_stop
from clip_train.train import compiling
from clip_train.train.accumulation import describe as describe_accumulation
from clip_train.train.loss import LogitScaleClamp
from clip_train.train.trainer import ClipTrainer

logger = logging.getLogger("run_clip")


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments ---------------------------------------------------------------------------------------------
    argv = list(sys.argv[1:] if argv is None else argv)
    # --device_id picks the card by visibility, which must be set before torch first looks at the devices.
    pinned = pin_card(device_id_given(argv), os.environ)
    family = backend.detect_family()  # once; passed down
    # The recipe's NPU options go first: parsing TrainingArguments sets the device and process group up.
    backend.set_npu_options(family)
    model_args, data_args, training_args, recipe_args = parse_args(argv, family)
    # Settled once, here, and only read afterwards (clip_train/config/settle.py).
    training_args, settled = settle(
        training_args, recipe_args, data_args, family, feeding.given_options(argv), pinned
    )
    plan = settled.plan

    # 2. Logging -----------------------------------------------------------------------------------------------
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    if training_args.should_log:  # as upstream: INFO on the main process unless --log_level says otherwise
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for lib in (logger, logging.getLogger("clip_train")):
        lib.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(backend.describe(plan))
    logger.info(compiling.describe(training_args))
    for note in plan.notes:
        logger.warning(note)
    if settled.feeding:
        logger.info("DataLoader settings not given, chosen: %s", settled.feeding)
    logger.info("world_size=%d rank=%d", training_args.world_size, training_args.process_index)
    if training_args.gradient_accumulation_steps > 1:
        logger.info(describe_accumulation(
            recipe_args.accumulation_mode, training_args.gradient_accumulation_steps,
            training_args.per_device_train_batch_size, training_args.world_size, recipe_args.loss_scope,
        ))  # fmt: skip
    if settled.kept_checkpoints:
        logger.info("Keeping the last %d checkpoints (--save_total_limit N to change, 0 keeps all)",
                    settled.kept_checkpoints)  # fmt: skip

    # The data's cheap checks (annotations parse, zips open) before the output folder is made or touched.
    check_data(data_args, training_args)
    if (
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    ):  # torchrun restarted us: resume, never wipe
        recipe_args.overwrite_output_dir = False
    resume_from = outputs.prepare_output_dir(training_args, recipe_args)
    set_seed(training_args.seed)

    # 3. Model, tokenizer, image processor ---------------------------------------------------------------------
    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    tokenizer = model_parts.load_part(
        AutoTokenizer, model_args.tokenizer_name or model_args.model_name_or_path, "tokenizer",
        use_fast=model_args.use_fast_tokenizer, **common,
    )  # fmt: skip
    image_processor = model_parts.load_part(
        AutoImageProcessor,
        model_args.image_processor_name or model_args.model_name_or_path,
        "image processor",
        **common,
    )
    # fp32 whatever dtype the folder was saved in: autocast / apex do the mixed precision.
    model = model_parts.load_part(
        AutoModel, model_args.model_name_or_path, "model", dtype=torch.float32, **common
    )
    model_parts.freeze_towers(model, model_args.freeze_vision_model, model_args.freeze_text_model)
    if settled.checkpoint_towers:
        model_parts.checkpoint_towers(model, training_args.activation_checkpointing_kwargs)
    image_size = model.config.vision_config.image_size

    # 4. Data: the splits this run needs, whatever their source (COCO folder, csv/json files, shards) ----------------
    cache_dir = data_args.image_cache_dir or images.default_cache_dir(model_args.cache_dir)
    inputs = get_data(data_args, training_args, tokenizer, image_size, cache_dir)
    train_input, eval_input = inputs.get("train"), inputs.get("validation")
    classes = None
    if training_args.do_eval:  # nothing evaluates otherwise: leave the class folder alone
        classes = zeroshot.from_args(
            data_args, tokenizer, image_size=image_size, cache_dir=cache_dir, training_args=training_args
        )
    elif data_args.zeroshot_dir:
        logger.warning("--zeroshot_dir is not used: this run does not evaluate (add --do_eval)")
    run_id = outputs.same_run(resume_from, training_args, recipe_args.loss_scope, model_args.model_name_or_path,
                              train_input, accumulation_mode=recipe_args.accumulation_mode)  # fmt: skip

    # 5. Trainer -----------------------------------------------------------------------------------------------
    trainer = ClipTrainer(
        model=model,
        args=training_args,
        train_input=train_input,
        eval_dataset=eval_input.dataset if eval_input else None,
        data_collator=data.Collator(
            tokenizer.pad_token_id,
            data_args.max_seq_length,
            data_args.pad_to_max_length,
            data_args.pad_to_multiple_of,
        ),
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        skip_steps=recipe_args.skip_steps,
        loss_scope=recipe_args.loss_scope,
        accumulation_mode=recipe_args.accumulation_mode,
        retrieval=recipe_args.retrieval_eval,
        pad_id=tokenizer.pad_token_id,
        zeroshot=classes,
        backend_plan=plan,
        callbacks=[checkpointing.CheckpointMarker(recipe_args.save_minutes, run_id)]
        + ([LogitScaleClamp(recipe_args.max_logit_scale)] if recipe_args.max_logit_scale else []),
    )
    skipped = {
        "train": train_input.skip_metrics("train") if train_input else {},
        "validation": eval_input.skip_metrics("eval") if eval_input else {},
    }  # rows left out while reading
    results: dict = {**skipped["train"], **skipped["validation"]}
    preemption = PreemptionHandler()  # SIGTERM / Ctrl-C: save at the end of the step, then stop
    trainer.add_callback(preemption)

    # 6. Training ----------------------------------------------------------------------------------------------
    final = finishing.FinalPhase()  # from here a SIGTERM waits for the final save to be complete
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
        preemption.check(training_args.output_dir)
        final.signum = (
            preemption.signum
        )  # one that came in the last step: stop once the final save is complete
        with final:
            metrics = {**train_result.metrics, **trainer.throughput_metrics(), **skipped["train"]}
            metrics.update(trainer.undecodable("train", "train"))
            metrics.update(trainer.backend_metrics("train"))
            metrics.update(memory.peak_device_memory_metrics(training_args.device))
            metrics["train_samples"] = train_input.rows
            if not metrics["train_timed_steps"]:
                logger.warning(
                    "no FPS: this run trained no step past --skip_steps %d (it ended at step %d of %d)",
                    recipe_args.skip_steps, trainer.state.global_step, trainer.state.max_steps,
                )  # fmt: skip
            trainer.save_model()
            if trainer.is_world_process_zero():
                processor = VisionTextDualEncoderProcessor(
                    image_processor=image_processor, tokenizer=tokenizer
                )
                processor.save_pretrained(training_args.output_dir)
                image_processor.save_pretrained(
                    training_args.output_dir
                )  # preprocessor_config.json for older readers
            for block in recipe_blocks("train", metrics):  # the recipe's grep reads the first block
                trainer.log_metrics("train", block)
            trainer.save_metrics("train", metrics, combined=False)  # all_results.json comes last
            trainer.save_state()
        final.stop_if_signalled(training_args)
        results.update(metrics)

    # 7. Evaluation --------------------------------------------------------------------------------------------
    with final:
        if training_args.do_eval:
            metrics = trainer.evaluate()
            metrics["eval_samples"] = eval_input.rows
            metrics.update(skipped["validation"])
            metrics.update(trainer.undecodable("eval", "eval"))
            for block in recipe_blocks("eval", metrics):
                trainer.log_metrics("eval", block)
            trainer.save_metrics("eval", metrics, combined=False)
            if training_args.do_train:
                trainer.save_state()  # trainer_state.json then holds the final evaluation too
            results.update(metrics)
        if trainer.is_world_process_zero():
            save_plots(trainer.state.log_history, training_args.output_dir)
            if training_args.do_train:  # the card goes with the saved model
                model_card.after_training(trainer, results, argv, backend.describe_precision(plan), data_args)
            if training_args.do_train or training_args.do_eval:  # last: the sign of a finished run
                finishing.write_results(training_args.output_dir, results)
    final.note_late_signal()
    return results


def cli(argv: list[str] | None = None) -> int:
    """main() with set-up and data problems as one line on stderr and exit code 2 (no traceback)."""
    try:
        main(argv)
    except (ArgumentError, DataError, SetupError, TrainingDiverged) as e:
        if says_errors(e):
            print(f"run_clip.py: error: {e}", file=sys.stderr)
        note_stop(2, str(e))  # under the launcher: torchrun's restarts must not rerun what cannot succeed
        return 2
    except Preempted as e:
        print(f"run_clip.py: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # argparse's usage error: a restart would repeat it too
        if e.code == 2:
            note_stop(2, "bad command line (see the usage error above)")
        raise
    finally:
        backend.leave_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
