"""Fine-tuning optimizer: layer-wise lr decay and the reference's weight-decay grouping.

`param_groups_lrd` of the reference: with L = depth + 1 layers, a parameter of layer l gets
lr x decay^(L - l). Layer 0 holds cls_token, pos_embed and patch_embed; blocks_i is layer
i + 1; everything else (fc_norm, head) is layer L (scale 1). Weight decay skips biases,
1-D tensors, cls_token and a learnable pos_embed (the model's `no_weight_decay` set).
"""
import jax
import optax

from bridle_jax.train import optim

EMBEDDING_KEYS = ("cls_token", "pos_embed", "patch_embed")


def layer_index(top_key: str, depth: int) -> int:
  """The reference layer id of a top-level parameter name."""
  if top_key in EMBEDDING_KEYS:
    return 0
  if top_key.startswith("blocks_"):
    return int(top_key.split("_", 1)[1]) + 1
  return depth + 1


def lr_scales(params: dict, depth: int, decay: float) -> dict:
  """A tree like `params` holding each leaf's lr multiplier decay^(depth + 1 - layer)."""
  scales = {}
  for key, tree in params.items():
    scale = decay ** (depth + 1 - layer_index(key, depth))
    scales[key] = jax.tree.map(lambda _: scale, tree)
  return scales


NO_DECAY_KEYS = ("cls_token", "pos_embed")


def decay_mask(params) -> dict:
  """True where weight decay applies: `optim.decay_mask` minus cls_token and pos_embed."""
  def exclude(path, decays):
    return decays and path[0].key not in NO_DECAY_KEYS
  return jax.tree_util.tree_map_with_path(exclude, optim.decay_mask(params))


def adamw_direction(finetune_config) -> optax.GradientTransformation:
  """AdamW direction without decay on biases, 1-D tensors, cls_token and pos_embed; the caller
  multiplies by `lr_scales` and the scheduled lr (so decay is scaled per layer too, as
  PyTorch's AdamW does)."""
  return optim.adamw_direction(finetune_config, mask=decay_mask)
