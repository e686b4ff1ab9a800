"""Test helpers: closed-form velocity fields and flow maps (Gaussian, Gaussian mixture), a tiny MLP.

Linear interpolation ``z_tau = tau * eps + (1 - tau) * x0`` with ``eps ~ N(0, I)``.

Gaussian ``x0 ~ N(mu, s^2 I)`` (per element; ``mu`` and ``s`` broadcast over trailing axes):
  marginal  z_tau ~ N(m_tau, sigma_tau^2) with m_tau = (1 - tau) mu,
            sigma_tau^2 = tau^2 + (1 - tau)^2 s^2;
  velocity  v(z, tau) = E[eps - x0 | z] = -mu + (tau - (1 - tau) s^2) / sigma_tau^2 * (z - m_tau)
            (= m' + sigma'/sigma (z - m): the flow transports z = m + sigma xi);
  flow map  z_r = m_r + (sigma_r / sigma_t) (z_t - m_t), so the average velocity
            u = (z_t - z_r) / (t - r) = -mu + (z_t - m_t) c(t, r) with
            c(t, r) = (sigma_t - sigma_r) / ((t - r) sigma_t)
                    = ((t + r) - s^2 (2 - t - r)) / (sigma_t (sigma_t + sigma_r))
            (the second form divides by no (t - r), so it is stable near t = r and equals the
            velocity coefficient at r = t).

Gaussian mixture ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I_D)`` over the last axis (each (b, f) frame is an
independent draw in R^D): the velocity is the posterior-weighted mix of the component velocities,
``v = sum_k w_k(z, tau) v_k(z, tau)`` with ``w_k ∝ pi_k N(z; (1 - tau) mu_k, sigma_k^2 I)``. Its
flow map has no closed form; :meth:`GaussianMixture.average_velocity` integrates the exact velocity
with RK4 and returns the average velocity as the mean RK4 slope (no cancellation near t = r).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _bt(t, z):
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (z.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class Gaussian:
    mu: np.ndarray  # broadcast over trailing axes
    s: float | np.ndarray

    def sample(self, key, shape):
        return jnp.asarray(self.mu) + jnp.asarray(self.s) * jax.random.normal(key, shape)

    def sigma(self, t):
        s2 = jnp.square(jnp.asarray(self.s, jnp.float32))
        return jnp.sqrt(t * t + (1 - t) ** 2 * s2)

    def velocity(self, z, t):
        t = _bt(t, z)
        mu = jnp.asarray(self.mu, jnp.float32)
        s2 = jnp.square(jnp.asarray(self.s, jnp.float32))
        return -mu + (t - (1 - t) * s2) / (t * t + (1 - t) ** 2 * s2) * (z - (1 - t) * mu)

    def average_velocity(self, z, t, r):
        t, r = _bt(t, z), _bt(r, z)
        mu = jnp.asarray(self.mu, jnp.float32)
        s2 = jnp.square(jnp.asarray(self.s, jnp.float32))
        st, sr = self.sigma(t), self.sigma(r)
        c = ((t + r) - s2 * (2 - t - r)) / (st * (st + sr))
        return -mu + (z - (1 - t) * mu) * c

    def flow_map(self, z, t, r):
        return z - (_bt(t, z) - _bt(r, z)) * self.average_velocity(z, t, r)

    def log_density(self, z, t):
        t = _bt(t, z)
        var = t * t + (1 - t) ** 2 * jnp.square(jnp.asarray(self.s, jnp.float32))
        d = z - (1 - t) * jnp.asarray(self.mu, jnp.float32)
        return jnp.sum(-0.5 * d * d / var - 0.5 * jnp.log(2 * jnp.pi * var))

    # numpy float64 reference of the residual of the stage-1 loss with the data velocity
    def np_average_velocity(self, z, t, r):
        z = np.asarray(z, np.float64)
        t = np.asarray(t, np.float64).reshape(np.shape(t) + (1,) * (z.ndim - np.ndim(t)))
        r = np.asarray(r, np.float64).reshape(np.shape(r) + (1,) * (z.ndim - np.ndim(r)))
        mu = np.asarray(self.mu, np.float64)
        s2 = np.square(np.asarray(self.s, np.float64))
        st = np.sqrt(t * t + (1 - t) ** 2 * s2)
        sr = np.sqrt(r * r + (1 - r) ** 2 * s2)
        c = ((t + r) - s2 * (2 - t - r)) / (st * (st + sr))
        return -mu + (z - (1 - t) * mu) * c


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    means: np.ndarray  # (K, D)
    stds: np.ndarray  # (K,)
    weights: np.ndarray  # (K,)
    rk4_steps: int = 48

    def sample(self, key, shape):
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, len(self.weights), shape[:-1], p=jnp.asarray(self.weights))
        means = jnp.asarray(self.means, jnp.float32)[comp]
        stds = jnp.asarray(self.stds, jnp.float32)[comp][..., None]
        return means + stds * jax.random.normal(k2, shape)

    def _components(self, z, t):
        # z: (..., D), t: (...,) -> per-component log weight (..., K) and velocity (..., K, D)
        mu = jnp.asarray(self.means, jnp.float32)
        s2 = jnp.square(jnp.asarray(self.stds, jnp.float32))
        tk = t[..., None]
        var = tk * tk + (1 - tk) ** 2 * s2  # (..., K)
        d = z[..., None, :] - (1 - tk)[..., None] * mu  # (..., K, D)
        dim = z.shape[-1]
        logw = (jnp.log(jnp.asarray(self.weights, jnp.float32)) - 0.5 * jnp.sum(d * d, -1) / var
                - 0.5 * dim * jnp.log(2 * jnp.pi * var))
        vel = -mu + ((tk - (1 - tk) * s2) / var)[..., None] * d
        return logw, vel

    def velocity(self, z, t):
        t = jnp.asarray(t, jnp.float32)
        logw, vel = self._components(z, t)
        w = jax.nn.softmax(logw, axis=-1)
        return jnp.sum(w[..., None] * vel, axis=-2)

    def log_density(self, z, t):
        logw, _ = self._components(z, jnp.asarray(t, jnp.float32))
        return jnp.sum(jax.nn.logsumexp(logw, axis=-1))

    def average_velocity(self, z, t, r):
        t = jnp.asarray(t, jnp.float32)
        r = jnp.asarray(r, jnp.float32)
        n = self.rk4_steps
        h = ((r - t) / n)[..., None]

        def body(i, carry):
            zz, acc = carry
            tau = (t + (r - t) * (i / n))[..., None]
            k1 = self.velocity(zz, tau[..., 0])
            k2 = self.velocity(zz + 0.5 * h * k1, (tau + 0.5 * h)[..., 0])
            k3 = self.velocity(zz + 0.5 * h * k2, (tau + 0.5 * h)[..., 0])
            k4 = self.velocity(zz + h * k3, (tau + h)[..., 0])
            slope = (k1 + 2 * k2 + 2 * k3 + k4) / 6
            return zz + h * slope, acc + slope

        _, acc = jax.lax.fori_loop(0, n, body, (z, jnp.zeros_like(z)))
        return acc / n

    def flow_map(self, z, t, r):
        return z - (_bt(t, z) - _bt(r, z)) * self.average_velocity(z, t, r)


def exact_apply(data):
    """An ``apply_fn`` that ignores params and context: the exact average velocity of ``data``."""
    return lambda params, z, t, r, context: data.average_velocity(z, t, r)


def exact_velocity_fn(data):
    """A ``velocity_fn(z, t, context)`` returning the exact marginal velocity of ``data``."""
    return lambda z, t, context: data.velocity(z, t)


def rk4_flow(velocity, z, t, r, steps):
    """Integrate dz/dtau = velocity(z, tau) from t to r (scalar times) with RK4 (reference solution)."""
    h = (r - t) / steps
    tau = t
    for _ in range(steps):
        k1 = velocity(z, tau)
        k2 = velocity(z + 0.5 * h * k1, tau + 0.5 * h)
        k3 = velocity(z + 0.5 * h * k2, tau + 0.5 * h)
        k4 = velocity(z + h * k3, tau + h)
        z = z + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        tau = tau + h
    return z


GAUSS = Gaussian(mu=np.array([1.5, -1.0, 0.5], np.float32), s=0.6)
MIXTURE = GaussianMixture(
    means=np.array([[1.5, 1.0], [-1.0, -1.5], [1.0, -2.0]], np.float32),
    stds=np.array([0.5, 0.7, 0.4], np.float32),
    weights=np.array([0.5, 0.3, 0.2], np.float32),
)


# ---------------------------------------------------------------------------------------------
# A tiny Flax MLP flow-map model, as an outside project would write it (no Wan code).

import flax.linen as nn  # noqa: E402


class TinyFlowMapMLP(nn.Module):
    """u(z, t, r, context) for latents (B, F, ...) of any trailing shape; context (B, E) or None."""

    hidden: int = 64

    @nn.compact
    def __call__(self, z, t, r, context=None):
        b, f = z.shape[:2]
        flat = z.reshape(b, f, -1)
        feats = [flat, t[..., None], r[..., None], (t - r)[..., None]]
        if context is not None:
            feats.append(jnp.broadcast_to(context[:, None, :], (b, f, context.shape[-1])))
        h = jnp.concatenate(feats, axis=-1).astype(jnp.float32)
        h = nn.silu(nn.Dense(self.hidden)(h))
        h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(flat.shape[-1])(h).reshape(z.shape)


def mlp_apply(model):
    return lambda params, z, t, r, context: model.apply({"params": params}, z, t, r, context)


def init_mlp(model, key, z_shape, context_dim=None):
    b, f = z_shape[:2]
    ctx = None if context_dim is None else jnp.zeros((b, context_dim))
    return model.init(key, jnp.zeros(z_shape), jnp.ones((b, f)), jnp.zeros((b, f)), ctx)["params"]
