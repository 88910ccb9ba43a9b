"""AdamW with the reference's weight-decay grouping and its per-step warmup + cosine.

The learning rate is applied outside the optax chain, from the phase's global step, so
that a parameter group updated only on some steps (the tokenizer in the joint phase)
follows the same schedule as the rest while its Adam moments and bias correction count
only its own updates, as PyTorch's AdamW does for parameters without a gradient.
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class WarmupCosine:
  """lr(step): linear warmup from 0 to base_lr, then half-cosine to min_lr (util/lr_sched.py,
  per step).

  Its four numbers are leaves, not constants: a jitted step takes the schedule as an
  argument, so runs that differ only in learning rate or length share one compiled program.
  """
  base_lr: Any
  min_lr: Any
  warmup_steps: Any
  total_steps: Any

  def __call__(self, step):
    step = jnp.asarray(step, jnp.float32)
    warm = self.base_lr * step / jnp.maximum(self.warmup_steps, 1)
    progress = (step - self.warmup_steps) / jnp.maximum(self.total_steps - self.warmup_steps, 1)
    cosine = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (
        1.0 + jnp.cos(math.pi * jnp.clip(progress, 0, 1)))
    return jnp.where(step < self.warmup_steps, warm, cosine)


def warmup_cosine(base_lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> WarmupCosine:
  """The schedule as float32 scalars (`jax.device_put` it once to pass it to every step)."""
  return WarmupCosine(*(np.float32(v) for v in (base_lr, min_lr, warmup_steps, total_steps)))


def decay_mask(params):
  """True where weight decay applies: not biases and not 1-D tensors (timm's grouping).

  cls_token and mask_token are decayed, as in the reference's pretraining. The tokenizer's
  `cold_start_encoder` is not: it is a frozen random projection that never gets a gradient,
  and PyTorch's AdamW leaves a parameter without a gradient untouched.
  """
  def decays(path, leaf):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names[-1] == "bias" or leaf.ndim <= 1 or "cold_start_encoder" in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def adamw_direction(phase_config, mask=decay_mask) -> optax.GradientTransformation:
  """Clipping (optional), Adam scaling and decoupled weight decay where `mask` says;
  the learning rate is applied by the caller."""
  b1, b2 = phase_config.betas
  parts = []
  if phase_config.clip_grad > 0:
    parts.append(optax.clip_by_global_norm(phase_config.clip_grad))
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=phase_config.eps),
            optax.add_decayed_weights(phase_config.weight_decay, mask=mask)]
  return optax.chain(*parts)


def global_norm(tree) -> jax.Array:
  """l2 norm of all leaves together, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def apply_direction(params, direction, lr):
  """params - lr * direction."""
  return jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), params, direction)
