"""The project's own latent Fashion-MNIST diffusion model, trained in two stages: a KL
autoencoder (``train_autoencoder.py``), then a class-conditional latent UNet with
classifier-free guidance on its latents (``train_unet.py``); see iec_jax/train_latent.py."""
