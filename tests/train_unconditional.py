"""The training loop of diffusers'
``examples/unconditional_image_generation/train_unconditional.py`` (accelerate, gradient
accumulation, mixed precision, EMA, DDPMScheduler, AdamW with a warm-up + cosine lr schedule,
``accelerator.save_state`` checkpoints and ``--resume_from_checkpoint``), written anew for
this test on 24 8x8 digits and a tiny UNet; the lines marked ``# <- recorder`` are what
recording adds. Launch it with ``torchrun`` (gloo on CPUs).

Two changes from the example make a resumed run comparable with an uninterrupted one: the
shuffle is seeded per epoch (accelerate's seedable sampler) and each batch's timesteps and noise
come from a generator seeded by epoch, batch and process. ``--crash_at_step S`` ends the process
with ``os._exit`` right after optimizer step S (no cleanup, like an OOM kill). Every process calls
``accelerator.save_state`` (the example calls it on the main process only): in accelerate 1.x
it waits for the other processes (a collective) and saves each process's random state.
On CPUs, launch with ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...`` (without that
variable, accelerate under torchrun trains each process alone).
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

import retrac_lib as rl


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--n_train", type=int, default=24)
    p.add_argument("--train_batch_size", type=int, default=3)
    p.add_argument("--num_epochs", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_scheduler", default="cosine")
    p.add_argument("--lr_warmup_steps", type=int, default=1)
    p.add_argument("--adam_weight_decay", type=float, default=1e-6)
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--ema_max_decay", type=float, default=0.9999)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing_steps", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--crash_at_step", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args):
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=args.seed))
    torch.manual_seed(args.seed)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=4, add_attention=False,
                        down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=1.0, power=3 / 4, model_cls=UNet2DModel,
                             model_config=model.config)
        accelerator.register_for_checkpointing(ema_model)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  betas=(0.95, 0.999), weight_decay=args.adam_weight_decay,
                                  eps=1e-8)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision,
                                                                        torch.float32)
    images = rl.data.digits("train").images[:args.n_train]   # your dataset, in [-1, 1]
    train_images = images.to(weight_dtype).float()        # <- recorder: what the model sees
    dataset = rl.recorder.IndexedDataset(images)          # <- recorder: items (index, image)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size,
                                                   shuffle=True)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * args.gradient_accumulation_steps,
        num_training_steps=len(train_dataloader) * args.num_epochs)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    num_update_steps_per_epoch = -(-len(train_dataloader) // args.gradient_accumulation_steps)

    global_step = first_epoch = resume_step = 0
    folder = args.output_dir / "recorded-run"                                  # <- recorder
    if args.resume_from_checkpoint:
        dirs = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                      key=lambda d: int(d.split("-")[1]))
        path = dirs[-1] if args.resume_from_checkpoint == "latest" else \
            args.resume_from_checkpoint
        accelerator.load_state(str(args.output_dir / path))
        global_step = int(path.split("-")[1])
        first_epoch = global_step // num_update_steps_per_epoch
        resume_step = (global_step * args.gradient_accumulation_steps) % (
            num_update_steps_per_epoch * args.gradient_accumulation_steps)
        recorder = rl.Recorder.resume(folder, accelerator.unwrap_model(model),  # <- recorder
                                      noise_scheduler, step=global_step, shared=True,
                                      flush_every=1)
    else:
        recorder = rl.Recorder(accelerator.unwrap_model(model), noise_scheduler,  # <- recorder
                               train_images, folder=folder, shared=True, flush_every=1,
                               replay_tolerance=1e-2)  # bf16: replays to ~1e-3

    for epoch in range(first_epoch, args.num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        for step, (indices, clean_images) in enumerate(train_dataloader):
            if epoch == first_epoch and step < resume_step:
                continue
            gen = torch.Generator().manual_seed(
                ((args.seed * 1000 + epoch) * 1000 + step) * 100 + accelerator.process_index)
            clean_images = clean_images.to(weight_dtype)
            noise = torch.randn(clean_images.shape, generator=gen).to(weight_dtype)
            bsz = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      generator=gen).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                lr = lr_scheduler.get_last_lr()[0]                             # <- recorder
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            recorder.step(indices, timesteps, noise, lr, loss=loss.item(),      # <- recorder
                          images=clean_images, sync=accelerator.sync_gradients)
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_model.step(model.parameters())
                global_step += 1
                if global_step % args.checkpointing_steps == 0:   # on every process
                    accelerator.save_state(str(args.output_dir / f"checkpoint-{global_step}"))
                if global_step == args.crash_at_step:
                    os._exit(3)
        recorder.checkpoint(accelerator.unwrap_model(model),                   # <- recorder
                            ema=ema_model if args.use_ema else None)
    recorder.close()                                                           # <- recorder
    # The example ends with accelerator.end_training(), whose destroy_process_group hung in
    # about one launch in ten here (gloo, torch 2.13); with no trackers it has nothing else to do.


if __name__ == "__main__":
    main(parse_args())
    # Everything is written. torch 2.13's gloo process group can deadlock when it is destroyed
    # in the interpreter's teardown (a worker thread waits for the GIL the finalizer holds:
    # pytorch#190489), so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
