"""Tasks that reconstruct what was removed: colorization, the context encoder (inpainting), the denoising autoencoder, MAE."""
