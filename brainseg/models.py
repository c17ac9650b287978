"""The Attention U-Net (Oktay et al. 2018) as a pure flax.linen module.

The defaults reproduce the seed project's PyTorch network layer for layer
(1,966,373 parameters for one input channel): two 3x3 conv + BatchNorm + ReLU
per level, 2x2 max-pool, 2x2 stride-2 transposed conv, additive attention gates
with an inner width of F/2, and a 1x1 head that returns logits.

A few ops are written by hand rather than taken from flax, each because its
gradient ran much slower on XLA's CPU backend than the same maths written
another way (results/PERFORMANCE.md): `nn.max_pool` and `nn.ConvTranspose`
(15-16x, as a reshape and an einsum), the decoder's first conv on a
concatenation, and BatchNorm + ReLU (one fused backward pass). Tests check
each matches the library ops.
"""
import functools
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu(x, scale, bias, epsilon):
  """relu(BatchNorm(x)) with batch statistics over all but the last axis.

  Returns (y, mean, var), var the biased variance, as `nn.BatchNorm` in training
  computes them. The hand-written gradient reads x and dy once for both
  reductions and once for dx; autodiff of the same maths made more passes
  over the activations (a conv + BN + ReLU block's gradient ran 14-20% faster).
  No forward-mode autodiff (jvp) through it: a custom_vjp allows reverse mode only.
  """
  y, mean, var, _ = _batch_norm_relu_forward(x, scale, bias, epsilon)
  return y, mean, var


def _batch_norm_relu_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(0., jnp.mean(jnp.square(xf), axes) - jnp.square(mean))
  rstd = lax.rsqrt(var + epsilon)
  y = jnp.maximum((xf - mean) * (rstd * scale) + bias, 0.).astype(x.dtype)
  return y, mean, var, rstd


def _batch_norm_relu_fwd(x, scale, bias, epsilon):
  y, mean, var, rstd = _batch_norm_relu_forward(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, bias, mean, rstd)


def _batch_norm_relu_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, scale, bias, mean, rstd = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dz = jnp.where(x_hat * scale + bias > 0, dy.astype(jnp.float32), 0.)  # Through the ReLU.
  dbias = jnp.sum(dz, axes)
  dscale = jnp.sum(dz * x_hat, axes)
  # d/dx of the normalisation (through the batch mean and variance too), plus
  # the statistics' own cotangents (zero when they only update running averages).
  dx = (scale * rstd) * (dz - (dbias + x_hat * dscale) / count)
  dx = dx + (dmean + 2 * dvar * x_hat / rstd) / count
  return dx.astype(x.dtype), dscale, dbias


batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


class BatchNormReLU(nn.Module):
  """`relu(nn.BatchNorm(momentum=0.9, epsilon=1e-5)(x))`, same variables and maths.

  Parameters (`scale`, `bias`) and statistics (`batch_stats`: `mean`, `var`)
  have the names, shapes and initial values of `nn.BatchNorm`'s, so checkpoints
  of either load into the other. Training uses `batch_norm_relu`'s fused gradient.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if not train:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
      return nn.relu(y).astype(self.dtype)
    y, mean, var = batch_norm_relu(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)


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
      x = BatchNormReLU(dtype=self.dtype, name=f'BatchNorm_{i}')(x, train)
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
