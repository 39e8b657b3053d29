"""The support code the scripts share, one concept per module.

- cli: user errors (one sentence, exit status 2), argument types, run-defining flags, output paths
- dist_util: processes and devices: torchrun or a world of one, precision
- preemption: stop signals: save the work in flight, exit with status 75, leave PREEMPTED
- collective: stop and error decisions every rank takes together, for unequal shares of work
- logs: the run's logger, and progress bars fit for a terminal or a file
- fileio: atomic writes, file hashes, writer locks, resumable outputs, free space
- seeding: every random stream: per training step, per sample index, per epoch
- checkpoints: checkpoint I/O (weights_only), model configs, official DiT / SiT / REPA weights
- training: TrainingRun (the run folder, resume, stop signals, finiteness, metrics, checkpoints),
  the EMA update, the per-step data order, the learning-rate schedule
- generation: what a checkpoint's config means for sampling: its process, a teacher's sampler
- trajectory_store: the store: format, writer of one shard, reader, boundaries and targets
- gan: the GAN fine-tuning stage: discriminator heads on the frozen teacher, losses, adaptive weight
- data: the digits, Fashion-MNIST, ImageFolder with ADM's centre crop, uint8 batches and PNG grids
- vae: the Stable Diffusion VAE: loading, encoding, decoding
- graphs: a sampler replayed from a CUDA graph, and the check that a sampler can be captured
- cost: FLOPs counted on the meta device, and timings
"""
