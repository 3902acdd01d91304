"""Generative objectives whose encoder or discriminator is the backbone: VAE, GAN (DCGAN, WGAN-GP), BiGAN, PixelCNN."""
