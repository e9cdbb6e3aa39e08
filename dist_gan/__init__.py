"""dist_gan: one GAN training loop over Hugging Face Accelerate, from a laptop CPU to a Slurm cluster."""

__version__ = "0.1.0"
