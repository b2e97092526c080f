"""Categorical draws and masked-diffusion samplers."""
