"""Model adapters: the IDDPM U-Net (improved-diffusion) and the masked-pixel denoiser."""
