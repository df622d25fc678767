"""A recorded training loop that saves its training state every few steps, can be killed at a
given step (``os._exit``: no cleanup, like an OOM kill) and resumed from its last saved state.

    python crashing_loop.py RUN_FOLDER STATE_FILE [--crash-at S] [--resume]

Every draw comes from a generator seeded by the epoch (the shuffle) or the step (timesteps and
noise), so a resumed run trains exactly as an uninterrupted one.
"""
import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler

import retrac_lib as rl

N, BATCH, EPOCHS, SAVE_EVERY, FLUSH_EVERY = 10, 4, 3, 3, 2
STEPS_PER_EPOCH = -(-N // BATCH)


def launch(args, timeout=240):
    """Run ``args`` (a training launch) with one BLAS thread and ``ACCELERATE_USE_CPU=1`` in a
    session of its own; a timeout kills it and every process below it (torchrun's workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:   # torchrun's workers have sessions
            with contextlib.suppress(OSError):             # of their own
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _descendants(pid):
    """The processes below ``pid`` (Linux ``/proc``)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def images():
    return torch.rand((N, 1, 8, 8), generator=torch.Generator().manual_seed(5)) * 2 - 1


def parts():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=4, add_attention=False,
                        down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2,
                                 num_training_steps=STEPS_PER_EPOCH * EPOCHS)
    return model, DDPMScheduler(num_train_timesteps=1000), optimizer, lr_scheduler


def main(folder, state_file, crash_at=None, resume=False):
    data = images()
    model, noise_scheduler, optimizer, lr_scheduler = parts()
    if resume:
        state = torch.load(state_file)
        for name, part in (("model", model), ("optimizer", optimizer), ("lr", lr_scheduler)):
            part.load_state_dict(state[name])
        first = state["step"]
        recorder = rl.Recorder.resume(folder, model, noise_scheduler, step=first,
                                      flush_every=FLUSH_EVERY)
    else:
        first = 0
        recorder = rl.Recorder(model, noise_scheduler, data, folder=folder,
                               flush_every=FLUSH_EVERY)
    model.train()
    for step in range(first, STEPS_PER_EPOCH * EPOCHS):
        epoch, b = divmod(step, STEPS_PER_EPOCH)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))
        idx = order[b * BATCH:(b + 1) * BATCH]
        gen = torch.Generator().manual_seed(1000 + step)
        timesteps = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn((len(idx), 1, 8, 8), generator=gen)
        noisy = noise_scheduler.add_noise(data[idx], noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample, noise)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        recorder.step(idx, timesteps, noise, lr, loss=loss.item(), images=data[idx])
        if (step + 1) % STEPS_PER_EPOCH == 0:
            recorder.checkpoint(model)
        if (step + 1) % SAVE_EVERY == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr": lr_scheduler.state_dict(), "step": step + 1}
            torch.save(state, f"{state_file}.tmp")
            os.replace(f"{state_file}.tmp", state_file)
            recorder.flush()
        if crash_at == step + 1:
            os._exit(3)
    recorder.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("state_file", type=Path)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    main(args.folder, args.state_file, args.crash_at, args.resume)
