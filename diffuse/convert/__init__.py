"""Import and export the ecosystem's models: diffusers folders and original Stable Diffusion single files."""
