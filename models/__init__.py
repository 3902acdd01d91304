"""Networks by name: the backbone factory (timm, never pretrained) and sslpipe's own timm models
(small-image ResNets, the DCGAN discriminator, PixelCNN). Imports only `core`, so pretext tasks,
the training runner and the eval stage all build networks the same way."""
