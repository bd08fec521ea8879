"""The trainer's library: an OT-paired conditional DDPM for unpaired image-to-image translation.

``config`` (TrainConfig: every option, validated), ``trainer`` (the model, the compiled step,
the training loop behind ``train.py``), ``checkpoint`` (checkpoint files), ``evaluation``
(metrics of a model on held-out images), ``distributed`` (torchrun processes), ``unet`` (the
conditional U-Net), ``diffusion`` (schedules, loss, DDIM and ancestral samplers), ``data``
(digits, shoes2bags, cmnist, folders), ``metrics`` (SSIM/PSNR, target accuracy, hue error,
FID), ``ema``.
"""
