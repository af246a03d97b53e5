"""The smoke train's loop (``dora-smoke-train``, ``python -m dora_network.smoke``): DoRA on the tiny SDXL model.

It makes sd-scripts' calls on the network module in sd-scripts' order (``train_network.py``), so a run exercises the
same contract a real training does:

    freeze base models -> create_network(1.0, dim, alpha, vae, [te1, te2], unet, neuron_dropout, **str kwargs)
    -> apply_to -> (gradient checkpointing) -> prepare_optimizer_params_with_multiple_te_lrs -> AdamW
    -> accelerator.prepare(network, optimizer, dataloader) -> prepare_grad_etc
    -> per epoch on_epoch_start; per step on_step_start, noise-prediction MSE, backward, all-reduce,
       clip_grad_norm_(get_trainable_params()), step -> save_weights(file, save_dtype, ss_* metadata)

then verifies its own file (see checks.py) and writes ``loss.png`` and ``summary.json``. Exit status 0 means
every check passed. Runs under ``accelerate launch`` too (data parallel; rank 0 saves and checks).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import SAVE_DTYPES, SmokeSettings, load_settings
from .data import Example, load_image_folder, synthetic_examples
from .model import Probe, build_model, make_probe, predict_noise, probe_output, text_conditioning
from .report import build_summary, moving_average, plot_loss, state_digest, training_metadata, write_json
from .state import (EpochShuffle, ResumeError, TrainingDiverged, diverged, load_state, save_state,
                    step_file_name, step_seed, weights_finite)

logger = logging.getLogger(__name__)

__all__ = ["SMOKE_COMMAND", "TrainResult", "TrainingDiverged", "main", "setup_logging", "train"]

#: The README's main command; tests check the README quotes it.
SMOKE_COMMAND = "bash scripts/smoke_train.sh"


@dataclass
class TrainResult:
    """What :func:`train` hands to the checks and the report (on rank 0 only ``file`` is written).

    Attributes:
        file: the saved network.
        losses: per-step loss, averaged over processes.
        seconds: wall time of the training loop.
        epochs: epochs started.
        num_images: training images.
        reference: the trained model's float32 output on the probe.
        probe: the fixed check batch.
        modules: adapters trained.
        digest: hash of the trained adapter weights (float32, before the save cast).
        device: where the models live.
        num_processes: data-parallel processes.
        is_main: this is the main process.
        resumed_from: the step a ``--resume`` continued from (0: a fresh run).
    """

    file: Path
    losses: list[float]
    seconds: float
    epochs: int
    num_images: int
    reference: torch.Tensor
    probe: Probe
    modules: int
    digest: str
    device: torch.device
    num_processes: int
    is_main: bool
    resumed_from: int = 0


def _examples(settings: SmokeSettings) -> list[Example]:
    if settings.train_data_dir:
        return load_image_folder(settings.train_data_dir, settings.resolution)
    return synthetic_examples(settings.num_images, settings.resolution, settings.seed)


@torch.no_grad()
def _cache_latents(vae: Any, examples: Sequence[Example], device: torch.device, seed: int) -> torch.Tensor:
    """VAE-encode every image once (sd-scripts' ``--cache_latents``): a seeded sample times ``scaling_factor``."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    chunks = []
    for start in range(0, len(examples), 8):
        images = torch.stack([e.image for e in examples[start:start + 8]]).to(device)
        chunks.append(vae.encode(images).latent_dist.sample(generator=generator))
    return torch.cat(chunks) * vae.config.scaling_factor


class _LatentDataset(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor, captions: list[str]) -> None:
        self.latents = latents.cpu()
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.latents[index], self.captions[index]


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or bool(xpu is not None and xpu.is_available()))


def _all_reduce_gradients(accelerator: Any, network: torch.nn.Module) -> None:
    """Average gradients over processes by hand, as sd-scripts does: the wrapped network's forward never runs, so
    DDP's own hooks never fire."""
    for param in network.parameters():
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def train(settings: SmokeSettings) -> TrainResult:
    """Train, save (rank 0) and return what the checks need. See the module docstring for the call order.

    Raises:
        TrainingDiverged: a NaN/Inf loss or adapter weight; files saved before it are kept.
        ResumeError: a ``--resume`` state that is missing or does not fit these settings.
    """
    from accelerate import Accelerator

    # cpu=True without an accelerator: only then does accelerate turn a multi-process launch into gloo data parallel
    # (MULTI_CPU) instead of N independent runs
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=not _has_accelerator())
    try:
        return _train(settings, accelerator)
    finally:
        accelerator.end_training()
        _forget_accelerate_state()


def _train(settings: SmokeSettings, accelerator: Any) -> TrainResult:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    import dora_network

    resume = load_state(settings.resume) if settings.resume else None
    if resume is not None:
        changed = resume.check_compatible(settings, accelerator.num_processes)
        logger.info("resuming from %s at step %d%s", resume.path, resume.step,
                    f" with new {', '.join(changed)} (not a replay of the original run)" if changed else "")
    device = accelerator.device
    set_seed(settings.seed)
    model = build_model(settings, device)  # base models frozen: requires_grad_(False), as sd-scripts
    examples = _examples(settings)
    captions = [e.caption for e in examples]
    latents = _cache_latents(model.vae, examples, device, settings.seed)
    probe = make_probe(model, latents, captions, settings.seed)

    train_unet, train_text_encoder = True, not settings.network_train_unet_only
    text_encoders, unet = model.text_encoders, model.unet
    net_kwargs = settings.network_kwargs()
    set_seed(settings.seed)  # the adapters' init does not depend on how much RNG the data drew
    network = dora_network.create_network(
        1.0, settings.network_dim, settings.network_alpha, model.vae, text_encoders, unet, neuron_dropout=None,
        **net_kwargs)
    network.apply_to(text_encoders, unet, train_text_encoder, train_unet)
    if resume is not None:
        network.load_state_dict(resume.network, strict=True)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()
        network.enable_gradient_checkpointing()
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(
        settings.text_encoder_lr or None, settings.unet_lr, settings.learning_rate)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        for group, fresh in zip(optimizer.param_groups, params):
            group["lr"] = fresh.get("lr", settings.learning_rate)  # this run's rates win (e.g. lowered)
    logger.info("optimizer groups: %s", ", ".join(f"{d} ({g.get('lr')})" for d, g in zip(descriptions, params)))

    sampler = EpochShuffle(len(captions), settings.seed)
    dataloader = torch.utils.data.DataLoader(
        _LatentDataset(latents, captions), batch_size=settings.train_batch_size, sampler=sampler, num_workers=0)
    network, optimizer, dataloader = accelerator.prepare(network, optimizer, dataloader)
    net = accelerator.unwrap_model(network)
    net.prepare_grad_etc(text_encoders, unet)
    if resume is not None and resume.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resume.scaler)
    # sd-scripts: models in train mode only for gradient checkpointing (diffusers checkpoints only in training)
    for part in (unet, *text_encoders):
        part.train(settings.gradient_checkpointing)

    trainable = list(net.get_trainable_params())
    steps_per_epoch = len(dataloader)
    epochs = math.ceil(settings.max_train_steps / steps_per_epoch)
    first_step = resume.step if resume is not None else 0
    losses: list[float] = list(resume.losses) if resume is not None else []
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last_good: Path | None = None

    def save(file: Path, steps: int) -> None:
        """The network file (rank 0) and its resume state, each written atomically."""
        if accelerator.is_main_process:
            metadata = training_metadata(settings, net_kwargs, started_at=started_at, steps=steps, epochs=epochs,
                                         num_images=len(examples), num_processes=accelerator.num_processes)
            net.save_weights(str(file), _save_dtype(settings), metadata)
            save_state(file, step=steps, losses=losses, network=net, optimizer=optimizer, scaler=accelerator.scaler,
                       settings=settings, num_processes=accelerator.num_processes)
            logger.info("saved %s (step %d)", file, steps)

    fault_kind, _, fault_step = settings.fault.partition("@")
    progress = tqdm(total=settings.max_train_steps, initial=first_step, desc="smoke train", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    started_at, start = time.time(), time.perf_counter()
    try:
        for epoch in range(first_step // steps_per_epoch, epochs):
            sampler.epoch = epoch
            net.on_epoch_start(text_encoders, unet)
            for index, (batch_latents, batch_captions) in enumerate(dataloader):
                step = epoch * steps_per_epoch + index + 1  # the optimizer step this batch makes, 1-based
                if step <= first_step:
                    continue  # done before the resume: same batches, skipped
                if step > settings.max_train_steps:
                    break
                torch.manual_seed(step_seed(settings.seed, step, accelerator.process_index))
                net.on_step_start(text_encoders, unet)
                loss = _noise_prediction_loss(settings, model, accelerator, batch_latents.to(device),
                                              batch_captions, train_text_encoder)
                if fault_kind == "nan_loss" and step == int(fault_step):
                    loss = loss * float("nan")
                # checked before backward, on the loss every process agrees on, so the weights are never touched
                step_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
                if not math.isfinite(step_loss):
                    raise diverged(f"the loss is {step_loss}", step, last_good, settings)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if accelerator.num_processes > 1:
                        _all_reduce_gradients(accelerator, network)
                    if settings.max_grad_norm:
                        accelerator.clip_grad_norm_(net.get_trainable_params(), settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if fault_kind == "nan_weight" and step == int(fault_step):
                    with torch.no_grad():
                        trainable[0].view(-1)[0] = float("nan")
                if not weights_finite(trainable):
                    raise diverged("an adapter weight became NaN/Inf in the optimizer step", step, last_good, settings)
                losses.append(step_loss)
                average = moving_average(losses[-settings.loss_window:], settings.loss_window)[-1]
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}", avg=f"{average:.4f}", epoch=epoch + 1)
                if settings.save_every_n_steps and step % settings.save_every_n_steps == 0 \
                        and step < settings.max_train_steps:
                    last_good = output_dir / step_file_name(settings.output_name, step)
                    save(last_good, step)
    finally:
        progress.close()  # before any error message, so it is not glued to the bar
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    net.eval()
    for part in (unet, *text_encoders):
        part.eval()
    digest = state_digest(net.state_dict())
    if settings.rank_digests:
        write_json(output_dir / f"rank{accelerator.process_index}_digest.json",
                   {"rank": accelerator.process_index, "sha256": digest, "steps": len(losses)})
    file = output_dir / f"{settings.output_name}.safetensors"
    save(file, len(losses))
    reference = probe_output(model, probe) if accelerator.is_main_process else torch.empty(0)
    result = TrainResult(file, losses, seconds, epochs, len(examples), reference, probe, len(net.loras), digest,
                         device, accelerator.num_processes, accelerator.is_main_process, first_step)
    accelerator.wait_for_everyone()
    return result


def _noise_prediction_loss(settings: SmokeSettings, model: Any, accelerator: Any, latents: torch.Tensor,
                           captions: Sequence[str], train_text_encoder: bool) -> torch.Tensor:
    """sd-scripts' epsilon loss for one batch: noise at random timesteps, the UNet's prediction, per-image MSE."""
    scheduler = model.noise_scheduler
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(train_text_encoder), accelerator.autocast():
        prompt_embeds, pooled = text_conditioning(model, captions)
    if settings.gradient_checkpointing:
        # sd-scripts: with (reentrant) checkpointing the block inputs must require grad for the adapters inside
        # to get gradients
        noisy_latents.requires_grad_(True)
        prompt_embeds.requires_grad_(True)
        pooled.requires_grad_(True)
    with accelerator.autocast():
        noise_pred = predict_noise(model, noisy_latents, timesteps, prompt_embeds, pooled)
    loss = torch.nn.functional.mse_loss(noise_pred.float(), noise.float(), reduction="none")
    return loss.mean(dim=(1, 2, 3)).mean()


def _forget_accelerate_state() -> None:
    """Drop accelerate's process-wide singleton so another in-process run may choose other settings (e.g. mixed
    precision; accelerate refuses to change an initialised state). Its own test suite resets it the same way."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset(reset_partial_state=True)


def _save_dtype(settings: SmokeSettings) -> torch.dtype | None:
    name = SAVE_DTYPES[settings.save_precision]
    return getattr(torch, name) if name else None


def setup_logging() -> None:
    """Root logging for the script at INFO: rich if importable, plain otherwise; existing handlers are kept."""
    from ..tools.cli import install_root_handler

    root = logging.getLogger()
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    install_root_handler("%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke train.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        0 when every self-check passed (or on a non-main process), 1 when one failed, 2 for bad settings or a
        resume state that does not fit them, 3 when the training diverged (NaN/Inf; earlier saves are kept).
    """
    try:
        settings = load_settings(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"dora-smoke-train: error: {error}", file=sys.stderr)
        return 2
    setup_logging()
    threads = torch.get_num_threads()
    if settings.num_cpu_threads > 0:
        torch.set_num_threads(settings.num_cpu_threads)
    try:
        return _run(settings)
    except ResumeError as error:
        print(f"dora-smoke-train: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"dora-smoke-train: error: {error}", file=sys.stderr)
        return 3
    finally:
        torch.set_num_threads(threads)  # an in-process caller (a test) gets its thread count back


def _run(settings: SmokeSettings) -> int:
    """Train, check, report; the exit status."""
    from .checks import run_checks

    begin = time.perf_counter()
    result = train(settings)
    if not result.is_main:
        return 0
    output_dir = Path(settings.output_dir)
    checks = run_checks(settings, result.file, result.reference, result.probe, result.losses, result.device,
                        _save_dtype(settings), result.modules)
    plot_loss(result.losses, max(1, min(settings.loss_window, len(result.losses))), output_dir / "loss.png",
              f"{settings.output_name}: {settings.algo}, dim {settings.network_dim}, lr {settings.learning_rate:g}")
    summary = build_summary(settings, result, checks, time.perf_counter() - begin)
    write_json(output_dir / "summary.json", summary)
    steps = summary["steps"]
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    print(f"trained {steps} steps{resumed} in {result.seconds:.1f} s ({summary['it_per_s']} it/s); loss moving average "
          f"{summary['first_moving_average_loss']:.4f} -> {summary['last_moving_average_loss']:.4f}")
    for check in checks:
        print(check.line())
    print(f"wrote {result.file}, {output_dir / 'loss.png'}, {output_dir / 'summary.json'}")
    failed = [check.name for check in checks if check.failed]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("smoke train OK")
    return 0

