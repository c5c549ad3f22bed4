"""What a model is trained on: pixels, or latents and the autoencoder that made them.

``dataset`` loads Fashion-MNIST, a folder of images (with its resize rule) or a latent file
as one in-memory tensor; ``latents`` reads what a latent file says about itself;
``autoencoder`` wraps a diffusers first stage for encoding and decoding. It may import
``meme.common`` and ``meme.model``.
"""
