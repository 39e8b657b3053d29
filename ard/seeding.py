"""Every seed of the repository, derived in one place.

Nothing draws from an unseeded generator, and no seed depends on the number of processes, so a
resumed run continues exactly and a file written on 1 or 8 processes is the same:

  training step    all the randomness of step s on rank r (noise, timesteps, class dropout, flips,
                   VAE posterior samples, GAN noise levels) comes from step_seed(seed, s, r);
  sample index     sample i of a file (its noise, and its label where drawn at random) comes from
                   its own generator, sample_generator(seed, i, stream); the trajectory writer and
                   the evaluation sampler use different streams, so evaluation noise never repeats
                   training noise;
  data order       epoch e of a dataset is epoch_permutation(n, seed, e); a rank that reads its own
                   part of the data has the seed rank_seed(seed, r).

The formulas are those the first release used, so that its stores, samples and
figures stay the same.
"""

import numpy as np
import torch

TRAJECTORY_STREAM = 0  # train_teacher_traj.py: the noise of trajectory i
EVALUATION_STREAM = 1  # sample_ddp.py: the label and noise of sample i


def mix(*keys):
    """A 32-bit seed that is a pure function of a tuple of non-negative integers."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def step_seed(seed, step, rank):
    """The seed of everything random in one training step of one rank."""
    return mix(seed, step, rank)


def sample_generator(seed, index, stream):
    """The generator of sample `index` of a file; see the streams above."""
    return torch.Generator().manual_seed(mix(seed, index, stream))


def epoch_permutation(num_items, seed, epoch):
    """The order in which epoch `epoch` visits a dataset of num_items."""
    return torch.randperm(
        num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    )


def rank_seed(seed, rank):
    """The data-order seed of a rank that reads only its own part of the data
    (train_ard.py's shards)."""
    return seed * 1009 + rank


def per_index_noise(seed, indices, shape, stream, num_classes=None, label_seed=None):
    """Each index's noise (len(indices), *shape) from its own generator, so that sample i is the
    same whichever process makes it. With num_classes, a random label per index is drawn first
    (before the noise) and (labels, noise) is returned; else the noise alone. label_seed (default:
    seed) draws the labels from another seed's generators, leaving the noise as it is: the same
    labels with other noises."""
    noise = torch.empty(len(indices), *shape)
    labels = torch.empty(len(indices), dtype=torch.long)
    for n, i in enumerate(indices):
        gen = sample_generator(seed, i, stream)
        if num_classes is not None:
            labels[n] = torch.randint(num_classes, (1,), generator=gen)
            if label_seed is not None and label_seed != seed:
                labels[n] = torch.randint(
                    num_classes, (1,), generator=sample_generator(label_seed, i, stream)
                )
        noise[n] = torch.randn(shape, generator=gen)
    return (labels, noise) if num_classes is not None else noise
