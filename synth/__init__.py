"""Med-DDPM: network config, diffusion, training, samplers and cohort synthesis."""
