"""The trainer's library: an OT-paired conditional DDPM for unpaired image-to-image translation.

``unet`` (the conditional U-Net), ``diffusion`` (schedules, loss, DDIM and ancestral
samplers), ``data`` (digits, shoes2bags, cmnist, folders), ``metrics`` (SSIM/PSNR, target
accuracy, hue error, FID), ``ema``, and ``trainer`` (the compiled step, checkpoints, the run
loop behind ``train.py``).
"""
