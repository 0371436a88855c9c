"""synthcxr: turn a pre-trained latent diffusion model into a generator of synthetic chest X-rays."""

__version__ = "0.1.0"
