"""Counter-based normal numbers: the value at an element depends only on (seed, key, flat index).

Initialising a weight this way gives every element the same value whether one process builds the
whole tensor or a rank builds only the shard it owns (tensor, pipeline or data parallel): each
computes exactly the indices it holds. Bit-equality across layouts also needs every operation to
give the same result at every position of a tensor of any size. Integer hashing does; PyTorch's
`log` and `cos` need not (they are not correctly rounded, and a CPU kernel computes a tensor's
vectorised body and its scalar tail with different implementations, so an element's last bit could
depend on where it sits), so the Box-Muller transform here evaluates both with IEEE basic
operations (+, -, *, /, sqrt and frexp, each correctly rounded, one torch call each so no fused
multiply-add can differ).

The hash is a 32-bit xorshift-multiply finaliser (two rounds per draw, the index's low and high
words), on int64 tensors with multipliers below 2**31, so no product overflows.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK = 0xFFFFFFFF
_QUARTER = (1 << 30) - 1
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # odd and below 2**31: x * m < 2**63 for any 32-bit x
_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
_TWO_POW_MINUS_32 = 2.0**-32
# log(m) = 2 atanh(f) = 2 (f + f^3/3 + f^5/5 + ...) with |f| <= 0.172: 12 terms reach float64's precision.
_ATANH = [1.0 / (2 * k + 1) for k in range(12)]
# sin and cos on [0, pi/2): Taylor series to the 23rd / 22nd power (the next term is below 1e-17).
_SIN = [(-1) ** k / math.factorial(2 * k + 1) for k in range(12)]
_COS = [(-1) ** k / math.factorial(2 * k) for k in range(12)]


def stream_keys(seed: int, key: str, streams: int) -> list[tuple[int, int]]:
    """Two 32-bit words per stream, from sha256 of (seed, key, stream): independent draws."""
    words = []
    for stream in range(streams):
        digest = hashlib.sha256(f"{seed}\0{key}\0{stream}".encode()).digest()
        words.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")))
    return words


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit finaliser on int64 holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & _MASK
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[1]) & _MASK
    return x ^ (x >> 15)


def hash32(index: torch.Tensor, words: tuple[int, int]) -> torch.Tensor:
    """32-bit hash (in int64) of non-negative int64 `index` under a stream's two key words."""
    low, high = index & _MASK, index >> 32
    return _mix(_mix(low ^ words[0]) ^ high ^ words[1])


def _horner(x: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """c0 + x (c1 + x (c2 + ...)), one correctly rounded torch op at a time."""
    out = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * x
        out = out + c
    return out


def log(u: torch.Tensor) -> torch.Tensor:
    """Natural log of positive float64 `u`, from frexp and the atanh series (about 1 ulp)."""
    mantissa, exponent = torch.frexp(u)  # u = mantissa * 2**exponent, mantissa in [0.5, 1)
    low = mantissa < _SQRT_HALF
    mantissa = torch.where(low, mantissa * 2.0, mantissa)
    exponent = exponent - low.to(exponent.dtype)
    f = (mantissa - 1.0) / (mantissa + 1.0)
    series = _horner(f * f, _ATANH) * f
    return series * 2.0 + exponent.to(u.dtype) * _LN2


def cos_turns(h: torch.Tensor) -> torch.Tensor:
    """cos(2 pi h / 2**32) for int64 `h` in [0, 2**32): the top two bits pick the quadrant, the
    other 30 the angle within it (exactly, in float64)."""
    quadrant = h >> 30
    angle = (h & _QUARTER).double() * (math.pi / 2 / (_QUARTER + 1))  # in [0, pi/2)
    square = angle * angle
    cos, sin = _horner(square, _COS), _horner(square, _SIN) * angle
    # cos(q pi/2 + a) = cos a, -sin a, -cos a, sin a for q = 0, 1, 2, 3
    value = torch.where(quadrant % 2 == 0, cos, sin)
    return torch.where((quadrant == 1) | (quadrant == 2), -value, value)


def normal(index: torch.Tensor, seed: int, key: str) -> torch.Tensor:
    """Standard normal float64 numbers at non-negative int64 `index`, by Box-Muller on two hashed
    uniforms: u1 in (0, 1] (so |value| <= 6.66) and the angle's turns u2 in [0, 1)."""
    first, second = stream_keys(seed, key, 2)
    u1 = (hash32(index, first) + 1).double() * _TWO_POW_MINUS_32
    radius = (log(u1) * -2.0).sqrt()  # sqrt is correctly rounded in IEEE arithmetic
    return radius * cos_turns(hash32(index, second))
