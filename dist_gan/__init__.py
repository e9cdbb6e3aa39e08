"""dist_gan: one GAN training loop over Hugging Face Accelerate, from a laptop CPU to a Slurm cluster."""

__version__ = "0.1.0"
__all__ = ["load_generator"]


def __getattr__(name: str):
    # Lazy: `python -m dist_gan.train` installs its signal handlers before torch is imported.
    if name == "load_generator":
        from dist_gan.tools.export import load_generator

        return load_generator
    raise AttributeError(f"module 'dist_gan' has no attribute {name!r}")
