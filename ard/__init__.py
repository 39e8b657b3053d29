"""The support code the scripts share, one concept per module:

cli               user errors (one sentence, exit status 2), argument types, output-path checks
dist_util         processes and devices: torchrun or a world of one, precision
preemption        stop signals: save the work in flight, exit with status 75
logs              the run's logger, and progress bars fit for a terminal or a file
fileio            atomic writes, file hashes, writer locks, resumable outputs, free space
seeding           every random stream: per training step, per sample index, per epoch
checkpoints       checkpoint I/O (weights_only), model configs, official DiT / SiT / REPA weights
training          the run folder and its resume, model + EMA + AdamW + DDP (Trainer), metrics, shared flags
trajectory_store  the trajectory store: format, writer of one shard, reader, boundaries and targets
gan               the GAN fine-tuning stage: discriminator heads on the frozen teacher, losses, adaptive weight
data              the digits, Fashion-MNIST, ImageFolder with ADM's centre crop, uint8 batches and PNG grids
vae               the Stable Diffusion VAE: loading, encoding, decoding
cost              FLOPs counted on the meta device, and timings
"""
