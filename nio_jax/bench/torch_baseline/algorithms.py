"""PyTorch baseline of the NIO / GradInit algorithms, written like the released reference code.

Everything here is a plain eager-PyTorch twin of what `nio_jax` computes, used by
`nio_jax/bench/engine.py` to time both frameworks on the same model, batch and weights and to
check that they agree (GradCosine to 1e-3 relative).

* sample-wise GradCosine: `torch.func.vmap(torch.func.grad(...))` over one-example batches
  through `torch.func.functional_call`;
* batch-setting GradCosine: ONE forward over the batch, then for each sub-batch
  (`nio_jax.subbatch_bounds`) `torch.autograd.grad(mean(loss[a:b]), params, create_graph=True)`
  as the released NIO code does;
* the NIO step: weights are parametrised as `s_l * w0_l` (one scalar per tensor), the NIO
  objective (`gc`, `gc_gn`, `gc_gn_sqrt`; constraint `mean‖g_i‖ > γ` switches to minimising
  the mean norm) is differentiated w.r.t. the scales and RescaleAdam updates them;
* one GradInit step (SGD variant: look-ahead loss after a normalised step, η = 0.1);
* one plain training step (forward + backward + SGD).

Batch norm: the model runs in training mode on *copies* of the buffers, so the running
statistics are never updated (as in the search).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from nio_jax import subbatch_bounds  # the released code's truncations


class ScaledModel:
  """A torch model with frozen initial weights `w0` and per-tensor scales `s` (`s_l * w0_l`).

  Attributes:
    model: the nn.Module (its own parameters are not used for the forward).
    w0: dict name -> tensor, the initial weights (no grad).
    buffers: dict name -> tensor (batch-norm running stats), cloned per call.
    grad_names: the parameter names whose gradients enter GradCosine (conv/dense/LN weights
      and biases, as in the released code; batch-norm parameters, position embeddings and
      other free parameters excluded).
    scales: dict name -> 0-d tensor (requires grad).
  """

  def __init__(self, model: torch.nn.Module, grad_filter: Callable[[str], bool] | None = None):
    self.model = model
    self.w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    # The released get_ordered_params: the weights and biases of Conv, Linear and LayerNorm
    # modules (nio_jax.leaves.GRAD_KINDS on the JAX side).
    gc_types = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.LayerNorm)
    gc_names = set()
    for mname, m in model.named_modules():
      if isinstance(m, gc_types):
        for pn, _ in m.named_parameters(recurse=False):
          gc_names.add(f"{mname}.{pn}" if mname else pn)
    filt = grad_filter or (lambda n: n in gc_names)
    self.grad_names = [n for n in self.w0 if filt(n)]
    self.scales = {n: torch.ones((), requires_grad=True) for n in self.w0}
    leaf = lambda n: n.rsplit(".", 1)[-1]
    self.min_scale = {n: (0.0 if "bias" in leaf(n) else 0.01) for n in self.w0}
    self.trainable = {n: bool(self.w0[n].norm() > 0) for n in self.w0}

  def params(self):
    return {n: self.scales[n] * w for n, w in self.w0.items()}

  def state(self, params):
    return {**params, **{n: b.clone() for n, b in self.buffers.items()}}

  def losses(self, params, x, y):
    out = functional_call(self.model, self.state(params), (x,))
    return F.cross_entropy(out, y, reduction="none")


# ---------------------------------------------------------------------------------------
# Per-example / sub-batch gradients and GradCosine


def per_example_grads(sm: ScaledModel, params, x, y):
  """dict name -> [B, ...] per-example gradients of the `grad_names` leaves (vmap(grad))."""
  other = {n: p for n, p in params.items() if n not in sm.grad_names}
  bufs = sm.buffers

  def loss_one(p_sel, xi, yi):
    out = functional_call(sm.model, {**other, **p_sel, **bufs}, (xi[None],))
    return F.cross_entropy(out, yi[None])

  p_sel = {n: params[n] for n in sm.grad_names}
  return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(p_sel, x, y)


def subbatch_grads(
  sm: ScaledModel, params, x, y, num_chunks: int, overlap: float, create_graph: bool = True
):
  """One forward, then `autograd.grad(create_graph=True)` per sub-batch (released NIO code)."""
  losses = sm.losses(params, x, y)
  p_sel = [params[n] for n in sm.grad_names]
  grads = []
  for a, b in subbatch_bounds(x.shape[0], num_chunks, overlap):
    g = torch.autograd.grad(losses[a:b].mean(), p_sel, create_graph=create_graph, retain_graph=True)
    grads.append(g)
  # list over sub-batches of tuples over leaves -> list over leaves of [D, ...]
  stacked = [torch.stack([g[k] for g in grads]) for k in range(len(p_sel))]
  return losses, stacked


def gc_from_grads(leaves: Sequence[torch.Tensor]):
  """(GC, norms) by the identity GC = (‖Σ u_i‖² − D) / (D(D−1))."""
  d = leaves[0].shape[0]
  flat = [g.reshape(d, -1) for g in leaves]
  sq = sum((f * f).sum(1) for f in flat)
  norms = torch.sqrt(sq)
  inv = 1.0 / norms
  usum_sq = sum(((inv[:, None] * f).sum(0) ** 2).sum() for f in flat)
  return (usum_sq - d) / (d * (d - 1)), norms


def gradcosine(sm: ScaledModel, x, y, num_chunks=None, overlap=0.0):
  """GC value (no graph) at the current scales."""
  params = {n: p.detach() for n, p in sm.params().items()}
  if num_chunks is None:
    g = per_example_grads(sm, params, x, y)
    leaves = [g[n] for n in sm.grad_names]
  else:
    params = {n: p.requires_grad_(True) for n, p in params.items()}
    _, leaves = subbatch_grads(sm, params, x, y, num_chunks, overlap, create_graph=False)
  gc, norms = gc_from_grads(leaves)
  return gc.detach(), norms.detach()


# ---------------------------------------------------------------------------------------
# RescaleAdam (the scale optimiser of NIO and GradInit)


class RescaleAdam:
  """Clip ±1, Adam with separate first moments for constraint/objective steps, shared second
  moment, then `s ← max(s, min_scale)`; zero-norm leaves are frozen (released RescaleAdam)."""

  def __init__(self, sm: ScaledModel, lr: float, b1=0.9, b2=0.999, eps=1e-8, clip=1.0):
    self.sm, self.lr, self.b1, self.b2, self.eps, self.clip = sm, lr, b1, b2, eps, clip
    z = lambda: {n: torch.zeros(()) for n in sm.scales}
    self.m = {False: z(), True: z()}
    self.v = z()
    self.n = {False: 0, True: 0}

  @torch.no_grad()
  def step(self, constraint: bool):
    self.n[constraint] += 1
    bc1 = 1 - self.b1 ** self.n[constraint]
    bc2 = 1 - self.b2 ** (self.n[False] + self.n[True])
    for name, s in self.sm.scales.items():
      g = s.grad if s.grad is not None else torch.zeros(())
      if self.clip:
        g = g.clamp(-self.clip, self.clip)
      m = self.m[constraint][name].mul_(self.b1).add_(g, alpha=1 - self.b1)
      v = self.v[name].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
      if not self.sm.trainable[name] or float(s) == 0.0:
        continue
      s.sub_(self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps))
      s.clamp_(min=self.sm.min_scale[name])
      s.grad = None


# ---------------------------------------------------------------------------------------
# One NIO step


def nio_objective(gc, norms, objective: str, gn_mul: float):
  """The NIO objective to minimise: `-gc`, `-gc - gn_mul·Σ‖g_i‖²` or `-gc - gn_mul·Σ‖g_i‖`."""
  if objective == "gc":
    return -gc
  if objective == "gc_gn":
    return -gc - gn_mul * (norms**2).sum()
  if objective == "gc_gn_sqrt":
    return -gc - gn_mul * norms.sum()
  raise ValueError(objective)


def nio_loss_and_grads(
  sm: ScaledModel,
  x,
  y,
  *,
  num_chunks=4,
  overlap=0.2,
  gamma=10.0,
  objective="gc_gn_sqrt",
  gn_mul=1.0,
):
  """Value of the NIO search loss and its gradient w.r.t. every scale (left in `.grad`)."""
  params = sm.params()
  if num_chunks is None:
    g = per_example_grads(sm, params, x, y)
    leaves = [g[n] for n in sm.grad_names]
  else:
    _, leaves = subbatch_grads(sm, params, x, y, num_chunks, overlap, create_graph=True)
  gc, norms = gc_from_grads(leaves)
  gn = norms.mean()
  constraint = bool(gn > gamma)
  loss = gn if constraint else nio_objective(gc, norms, objective, gn_mul)
  for s in sm.scales.values():
    s.grad = None
  loss.backward()
  return dict(loss=loss.detach(), gc=gc.detach(), grad_norms=norms.detach(), constraint=constraint)


def nio_step(sm: ScaledModel, opt: RescaleAdam, x, y, **kw):
  """One NIO step: the search loss and its gradient (`nio_loss_and_grads`), then RescaleAdam."""
  out = nio_loss_and_grads(sm, x, y, **kw)
  opt.step(out["constraint"])
  return out


# ---------------------------------------------------------------------------------------
# One GradInit step (SGD variant)


def gradinit_step(sm: ScaledModel, opt: RescaleAdam, x, y, x2, y2, *, eta=0.1, gamma=1.0):
  """S = (B0, B1) = (x[:B/2], x[B/2:]); S̃ = B0 ∪ B2 with B2 = (x2, y2) a fresh half-batch.

  gn = ‖∇θ L(S)‖₂; constraint step if gn > γ, else L(S̃; θ − η·g/‖g‖)/η with the direction
  held constant. Gradients w.r.t. every parameter tensor (GradInit's reference)."""
  params = sm.params()
  names = list(params)
  losses = sm.losses(params, x, y)
  g = torch.autograd.grad(losses.mean(), [params[n] for n in names], create_graph=True)
  gn = torch.sqrt(sum((t * t).sum() for t in g))
  constraint = bool(gn > gamma)
  if constraint:
    loss = gn
  else:
    gnd = gn.detach()
    new = {n: params[n] - eta * g_.detach() / gnd for n, g_ in zip(names, g)}
    half = x.shape[0] // 2
    xs = torch.cat([x[:half], x2])
    ys = torch.cat([y[:half], y2])
    loss = sm.losses(new, xs, ys).mean() / eta
  for s in sm.scales.values():
    s.grad = None
  loss.backward()
  opt.step(constraint)
  return dict(loss=loss.detach(), grad_norm=gn.detach(), constraint=constraint)


# ---------------------------------------------------------------------------------------
# One MetaInit step (sign-momentum variant, the paper's)


def metainit_step(sm: ScaledModel, momentum: dict, x, y, *, lr=0.1, mom=0.9, eps=1e-5):
  """GQ = mean |(g − Hg) / (g + ε·sign g) − 1| over every parameter, Hg = ∇θ ½‖g‖²
  (double backward, as the MetaInit reference computes it); its gradient w.r.t. the scales
  (a third backward); then the sign-momentum update of each ≥ 2-dim tensor's norm
  (`nio_jax.methods.metainit`). `momentum` (name -> tensor) is updated in place."""
  params = sm.params()
  names = list(params)
  plist = [params[n] for n in names]
  loss = sm.losses(params, x, y).mean()
  g = torch.autograd.grad(loss, plist, create_graph=True)
  hg = torch.autograd.grad(sum((t * t).sum() for t in g) / 2, plist, create_graph=True)
  n = sum(t.numel() for t in g)
  gq = (
    sum(
      ((gl - hl) / (gl + eps * torch.where(gl >= 0, 1.0, -1.0).detach()) - 1).abs().sum()
      for gl, hl in zip(g, hg)
    )
    / n
  )
  for s in sm.scales.values():
    s.grad = None
  gq.backward()
  with torch.no_grad():
    for name in names:
      s = sm.scales[name]
      if s.grad is None or sm.w0[name].dim() < 2 or not sm.trainable[name]:
        continue
      d = torch.sign(s * s.grad)
      m = mom * momentum.get(name, torch.zeros(())) - lr * d
      norm = s.abs() * sm.w0[name].norm()
      s.mul_((norm + m) / norm)
      momentum[name] = m
  return dict(gq=gq.detach(), loss=loss.detach())


# ---------------------------------------------------------------------------------------
# One plain training step


def make_train_step(model: torch.nn.Module, lr: float = 0.1):
  """`step(x, y) -> loss`: one plain training step of `model` (cross-entropy, SGD with
  momentum 0.9)."""
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()

  return step
