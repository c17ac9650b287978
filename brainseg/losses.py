"""Training losses on logits; all are finite on batches without any tumour."""
import jax
import jax.numpy as jnp
import optax

LOSSES = ('bce', 'bce_dice')


def bce(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Mean binary cross-entropy over pixels (PyTorch's BCEWithLogitsLoss)."""
  return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def soft_dice(logits: jnp.ndarray, targets: jnp.ndarray, smooth: float = 1.0) -> jnp.ndarray:
  """1 - soft Dice over the whole batch, smoothed.

  Pooling the batch (rather than averaging per-slice Dice) keeps empty slices
  from dominating; `smooth` makes the loss ~0 when prediction and target are
  both empty, so confident correct negatives cost nothing and gradients stay finite.
  """
  probs = jax.nn.sigmoid(logits)
  intersection = jnp.sum(probs * targets)
  total = jnp.sum(probs) + jnp.sum(targets)
  return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def segmentation_loss(name: str, logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """The loss a config names: 'bce' (the seed's) or 'bce_dice' (their sum)."""
  if name == 'bce':
    return bce(logits, targets)
  if name == 'bce_dice':
    return bce(logits, targets) + soft_dice(logits, targets)
  raise ValueError(f'config loss must be one of {LOSSES}, got {name!r}')
