"""The Attention U-Net (Oktay et al. 2018) as a pure flax.linen module.

The defaults reproduce the seed project's PyTorch network layer for layer
(1,966,373 parameters for one input channel): two 3x3 conv + BatchNorm + ReLU
per level, 2x2 max-pool, 2x2 stride-2 transposed conv, additive attention gates
with an inner width of F/2, and a 1x1 head that returns logits.

Two ops are written by hand rather than with `nn.max_pool` and
`nn.ConvTranspose`: in a prototype measured before brainseg existed, their
gradients ran 15-16x slower on XLA's CPU backend than the same maths written
as a reshape (and an einsum); tests check both match the library ops.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Dtype = Any


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max-pool with stride 2 on NHWC input, as a reshape and a max."""
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'max_pool_2x2 needs even height and width, got {h}x{w}')
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UpConv2x2(nn.Module):
  """2x2 stride-2 transposed convolution, written as one einsum.

  With stride equal to kernel size the output blocks do not overlap, so each
  input pixel maps to its own 2x2 output block: out[2i+a, 2j+b] = x[i, j] @ W[a, b].
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, h, w, c = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (c, 2, 2, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    y = jnp.einsum('nhwc,cabf->nhawbf', x, kernel.astype(self.dtype))
    y = y.reshape(n, 2 * h, 2 * w, self.features)
    return y + bias.astype(self.dtype)


class ConcatConv3x3(nn.Module):
  """3x3 convolution (padding 1, with bias) of the channel concatenation of `inputs`.

  The concatenation is never built: conv(concat([a, b]), W) is computed as
  conv(a, W_a) + conv(b, W_b), W_a and W_b the kernel's input-channel blocks.
  Parameters, their names, shapes and initial values are those of
  `nn.Conv(features, (3, 3), padding=1)` on the concatenation. On XLA's CPU
  backend the decoder's 32->16 conv at 128x128 ran at a third of the speed
  per FLOP of two 16->16 ones (72 ms against 28 ms forward, batch 16).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
    widths = [x.shape[-1] for x in inputs]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, sum(widths), self.features), jnp.float32).astype(self.dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    out, start = 0, 0
    for x, width in zip(inputs, widths):
      out = out + lax.conv_general_dilated(
          x.astype(self.dtype), kernel[:, :, start:start + width], (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      start += width
    return out + bias.astype(self.dtype)


class ConvBlock(nn.Module):
  """Two (3x3 conv with bias -> BatchNorm -> ReLU) layers, as in the seed.

  `x` is one array, or a list of arrays the first conv reads as if concatenated
  along channels (the decoder's gated skip and up-sampled inputs).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool) -> jnp.ndarray:
    for i in range(2):
      if i == 0 and isinstance(x, (list, tuple)):
        x = ConcatConv3x3(self.features, self.dtype, name='Conv_0')(x)
      else:
        x = nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype, name=f'Conv_{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


class AttentionGate(nn.Module):
  """Additive attention gate: skip * sigmoid(psi(relu(Wg g + Wx x))).

  Returns the gated skip connection and the attention map (N, H, W, 1).
  """
  inner_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, gate: jnp.ndarray, skip: jnp.ndarray, train: bool):
    def conv_bn(x, features, name):
      x = nn.Conv(features, (1, 1), dtype=self.dtype, name=f'{name}_conv')(x)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          dtype=self.dtype, name=f'{name}_bn')(x)

    inner = nn.relu(conv_bn(gate, self.inner_features, 'gate') +
                    conv_bn(skip, self.inner_features, 'skip'))
    attention = nn.sigmoid(conv_bn(inner, 1, 'psi'))
    return skip * attention, attention


class AttentionUNet(nn.Module):
  """Attention U-Net on NHWC images; returns per-pixel logits (N, H, W, 1).

  Attributes:
    features: channel width of each level, shallowest first; its length is the depth.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """
  features: Sequence[int] = (16, 32, 64, 128, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    skips = []
    for level, width in enumerate(self.features):
      if level:
        x = max_pool_2x2(x)
      x = ConvBlock(width, self.dtype, name=f'encoder_{level}')(x, train)
      skips.append(x)
    skips.pop()  # The deepest level feeds the decoder directly.
    for level, width in reversed(list(enumerate(self.features[:-1]))):
      up = UpConv2x2(width, self.dtype, name=f'up_{level}')(x)
      gated, attention = AttentionGate(width // 2, self.dtype, name=f'gate_{level}')(
          up, skips.pop(), train)
      self.sow('intermediates', f'attention_{level}', attention)
      # Only the shallowest block reads its inputs unconcatenated: that is where
      # XLA's CPU conv is slow on the concatenation (results/PERFORMANCE.md);
      # deeper down the split conv's gradient measured slower than the concat's.
      inputs = [gated, up] if level == 0 else jnp.concatenate([gated, up], axis=-1)
      x = ConvBlock(width, self.dtype, name=f'decoder_{level}')(inputs, train)
    logits = nn.Conv(1, (1, 1), dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32)


def count_params(params) -> int:
  """Number of trainable scalars in a params tree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
