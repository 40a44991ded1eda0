"""Tests for diffproc.ops against scipy / closed forms.

Spec: methods_blur_sie_baselines.md §9.1 (items 1-8); methods_gddm_epdm.md §2.10 (items 1-8) and §1.12.1.
float64 and seeded unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import torch

from diffproc.ops import (
    GRAD_NOISE_SCALE,
    SeparableBasis,
    curl,
    dct2,
    dct_frequencies,
    dct_matrix,
    edge_map,
    gaussian_kernel_1d,
    grad,
    grad_adjoint,
    heat_blur,
    idct2,
    kernel_spectrum,
    laplacian,
    laplacian_noise_scale,
    neumann_eigenvalues,
    perona_malik,
    poisson_from_gradient,
    poisson_from_laplacian,
    screened_poisson,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(-2, -1))


# ------------------------------------------------------------------------------------------------------
# DCT and separable bases (blur spec §9.1)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 16, 64])
def test_dct_matrix_orthonormal(n: int) -> None:
    m = dct_matrix(n)
    assert (m @ m.T - torch.eye(n, dtype=F64)).abs().max() < 1e-12
    # rows are the DCT-II basis of scipy.fft.dct(type=2, norm='ortho')
    ref = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    assert np.abs(m.numpy() - ref).max() < 1e-12


def test_dct_matrix_is_cached_per_dtype_device() -> None:
    assert dct_matrix(8) is dct_matrix(8)
    assert dct_matrix(8, torch.float32).dtype == torch.float32
    assert dct_matrix(8, torch.float32) is not dct_matrix(8)


def test_dct2_round_trip_and_scipy() -> None:
    x = _randn(2, 3, 12, 16)
    u = dct2(x)
    assert (idct2(u) - x).abs().max() < 1e-12
    assert (dct2(idct2(x)) - x).abs().max() < 1e-12
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert np.abs(u.numpy() - ref).max() < 1e-12
    ref_inv = scipy.fft.idctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert np.abs(idct2(x).numpy() - ref_inv).max() < 1e-12
    # any leading dims, including none
    assert (dct2(x[0, 0]) - u[0, 0]).abs().max() < 1e-12
    assert dct2(x[None]).shape == (1, 2, 3, 12, 16)


def test_dct2_parseval_and_dtype() -> None:
    x = _randn(4, 2, 9, 9, seed=1)
    u = dct2(x)
    assert torch.allclose((u**2).sum(dim=(-2, -1)), (x**2).sum(dim=(-2, -1)), rtol=1e-13, atol=0)
    x32 = x.float()
    u32 = dct2(x32)
    assert u32.dtype == torch.float32
    assert (idct2(u32) - x32).abs().max() < 1e-5
    with pytest.raises(TypeError, match="floating-point"):
        dct2(torch.ones(4, 4, dtype=torch.int64))


def test_neumann_diagonalisation_of_symmetric_kernel_conv() -> None:
    # Half-sample symmetric ("d c b a | a b c d") extension + symmetric separable kernel == DCT multiplier
    # ĝ(ω_k) ĝ(ω_l), ĝ(ω) = g(0) + 2 Σ_m g(m) cos(ω m). scipy's mode='reflect' is half-sample symmetric.
    rng = np.random.default_rng(3)
    h, w, r = 12, 10, 4
    half = rng.uniform(-0.5, 1.0, size=r + 1)
    g = np.concatenate([half[:0:-1], half])  # symmetric, length 2r+1
    x = rng.standard_normal((h, w))
    conv = scipy.ndimage.correlate(x, np.outer(g, g), mode="reflect")
    m = np.arange(r + 1)

    def ghat(n: int) -> np.ndarray:
        om = np.pi * np.arange(n) / n
        wts = np.where(m == 0, 1.0, 2.0)
        return np.cos(om[:, None] * m[None, :]) @ (wts * half)

    spec = torch.from_numpy(np.outer(ghat(h), ghat(w)))
    out = idct2(spec * dct2(torch.from_numpy(x)))
    assert np.abs(out.numpy() - conv).max() < 1e-12
    # off-diagonal part of the operator in the DCT basis is zero
    mh, mw = dct_matrix(h).numpy(), dct_matrix(w).numpy()
    op_h = mh @ scipy.ndimage.correlate1d(np.eye(h), g, axis=0, mode="reflect") @ mh.T
    assert np.abs(op_h - np.diag(np.diag(op_h))).max() < 1e-12
    assert np.abs(np.diag(op_h) - ghat(h)).max() < 1e-12


def test_sampled_kernel_spectrum_is_exact_for_official_kernel() -> None:
    # The official sampled kernel (size 2n-1, σ px) under half-sample-symmetric extension.
    n, sigma = 8, 1.3
    g = gaussian_kernel_1d(2 * n - 1, sigma).numpy()
    x = _randn(n, n, seed=4)
    conv = scipy.ndimage.correlate(x.numpy(), np.outer(g, g), mode="reflect")
    out = idct2(kernel_spectrum(n, n, sigma, kind="sampled") * dct2(x))
    assert np.abs(out.numpy() - conv).max() < 1e-12
    # blur spec §1.2 numbers at σ = 0.4: ĝ(π) ≈ 0.840 (n = 64: ω_63 = 63π/64)
    d = kernel_spectrum(64, 64, 0.4, kind="sampled")
    assert d[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert d[0, -1] == pytest.approx(0.8385, abs=1e-3)
    with pytest.raises(ValueError, match="sampled"):
        kernel_spectrum(4, 4, 1.0, kind="box")  # type: ignore[arg-type]


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_dct_heat_blur_equals_scipy_gaussian_filter(sigma: float) -> None:
    x = _randn(2, 16, 16, seed=5)
    out = heat_blur(x, sigma)
    for b in range(2):
        ref = scipy.ndimage.gaussian_filter(x[b].numpy(), sigma, mode="reflect", truncate=8.0)
        assert np.abs(out[b].numpy() - ref).max() < 1e-9
    # kernel_spectrum('heat') is the same multiplier
    spec = kernel_spectrum(16, 16, sigma, kind="heat")
    assert (idct2(spec * dct2(x)) - out).abs().max() < 1e-14
    assert torch.allclose(spec, torch.exp(-0.5 * sigma**2 * dct_frequencies(16, 16)))


def test_heat_semigroup_and_dc() -> None:
    x = _randn(3, 2, 16, 16, seed=6)
    s1, s2 = 0.7, 1.9
    a = heat_blur(heat_blur(x, s1), s2)
    b = heat_blur(x, math.hypot(s1, s2))
    assert (a - b).abs().max() < 1e-12
    assert (_spatial_mean(b) - _spatial_mean(x)).abs().max() < 1e-12
    # per-sample sigma tensor
    sig = torch.tensor([0.5, 1.0, 2.0], dtype=F64).view(3, 1, 1, 1)
    y = heat_blur(x, sig)
    for i in range(3):
        assert (y[i] - heat_blur(x[i], float(sig[i]))).abs().max() < 1e-13
    lam = dct_frequencies(16, 16)
    assert lam[0, 0] == 0 and lam[-1, -1] == pytest.approx(2 * (math.pi * 15 / 16) ** 2)


def _toeplitz_matrix(n: int, sigma: float) -> np.ndarray:
    g = gaussian_kernel_1d(2 * n - 1, sigma).numpy()
    i = np.arange(n)
    return g[i[None, :] - i[:, None] + n - 1]


def test_toeplitz_eig_basis_reconstructs_separable_toeplitz_conv() -> None:
    n = 16
    basis = SeparableBasis.toeplitz_eig(n, sigma=0.4)
    assert basis.kind == "toeplitz_eig" and basis.eigenvalues.shape == (n, n)
    mh, _ = basis.matrices()
    assert (mh @ mh.T - torch.eye(n, dtype=F64)).abs().max() < 1e-12
    hm = _toeplitz_matrix(n, 0.4)
    x = _randn(2, 3, n, n, seed=7)
    ref = hm @ x.numpy() @ hm.T
    out = basis.inverse(basis.eigenvalues * basis.forward(x))
    assert np.abs(out.numpy() - ref).max() < 1e-10
    # eigenvectors are (almost exactly) DST-I sine vectors, in descending-eigenvalue order
    j = np.arange(n)
    dst = np.sqrt(2 / (n + 1)) * np.sin(np.pi * (j[:, None] + 1) * (j[None, :] + 1) / (n + 1))
    overlap = np.abs(np.sum(mh.numpy() * dst, axis=1))
    assert overlap.min() >= 0.9999
    # eigenvalue grid is descending along both axes with the §1.2 range at n = 64
    d64 = SeparableBasis.toeplitz_eig(64).eigenvalues
    assert d64.min().item() == pytest.approx(0.7032, abs=1e-4)
    assert d64.max().item() == pytest.approx(0.9998, abs=1e-4)
    assert (d64[1:, 0] <= d64[:-1, 0]).all()


def test_toeplitz_eig_clamps_eigenvalues_like_official_zero() -> None:
    # large σ makes the small-eigenvalue tail fall below ZERO = 0.03: clamp (official) not zero (DDRM)
    basis = SeparableBasis.toeplitz_eig(16, sigma=3.0)
    d = basis.eigenvalues
    assert d.min().item() == pytest.approx(0.03**2, rel=1e-12)
    assert d.max().item() <= 1.0


def test_dct_and_identity_basis() -> None:
    x = _randn(2, 3, 8, 12, seed=8)
    b = SeparableBasis.dct(8, 12)
    assert b.kind == "dct" and b.eigenvalues is None
    assert (b.forward(x) - dct2(x)).abs().max() < 1e-14
    assert (b.inverse(b.forward(x)) - x).abs().max() < 1e-12
    assert b.forward(x.float()).dtype == torch.float32
    ident = SeparableBasis.identity(8, 12)
    assert ident.forward(x) is x and ident.inverse(x) is x
    with pytest.raises(ValueError, match="spatial shape"):
        b.forward(_randn(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------------------
# Finite differences and Poisson (GDDM spec §2.10)
# ------------------------------------------------------------------------------------------------------


def _numpy_grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    du = np.zeros_like(x)
    dv = np.zeros_like(x)
    du[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    dv[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return du, dv


def _numpy_laplacian_replicate(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return p[..., 1:-1, 2:] + p[..., 1:-1, :-2] + p[..., 2:, 1:-1] + p[..., :-2, 1:-1] - 4 * x


def test_grad_layout_and_adjoint_identity() -> None:
    x = _randn(2, 3, 9, 11, seed=10)
    g = _randn(2, 6, 9, 11, seed=11)
    dx = grad(x)
    du, dv = _numpy_grad(x.numpy())
    assert dx.shape == (2, 6, 9, 11)
    assert np.array_equal(dx[:, :3].numpy(), du) and np.array_equal(dx[:, 3:].numpy(), dv)
    lhs = (dx * g).sum()
    rhs = (x * grad_adjoint(g)).sum()
    assert abs(lhs - rhs) < 1e-12 * max(1.0, abs(lhs.item()))
    # -DᵀD is the replicate-padded 5-point Laplacian
    ref = _numpy_laplacian_replicate(x.numpy())
    assert np.abs(-grad_adjoint(dx).numpy() - ref).max() < 1e-12
    assert np.abs(laplacian(x).numpy() - ref).max() < 1e-12
    assert laplacian(x).sum(dim=(-2, -1)).abs().max() < 1e-12
    assert (laplacian(x, "5point_quarter") - laplacian(x) / 4).abs().max() < 1e-15


def test_dct_diagonalises_DtD() -> None:
    h, w = 10, 13
    x = _randn(2, 2, h, w, seed=12)
    lam = neumann_eigenvalues(h, w)
    out = idct2(lam * dct2(x))
    assert (grad_adjoint(grad(x)) - out).abs().max() < 1e-12
    assert lam[0, 0] == 0
    assert 7.5 < lam.max().item() < 8.0
    big = neumann_eigenvalues(64, 64)
    assert 8.0 - big.max().item() < 0.01


@pytest.fixture(scope="module")
def astronaut64() -> torch.Tensor:
    skimage = pytest.importorskip("skimage")
    from skimage.transform import resize

    img = skimage.data.astronaut().astype(np.float64) / 255.0
    img = resize(img, (64, 64, 3), anti_aliasing=True, order=1)
    x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2.0 - 1.0
    return x.contiguous()


def test_poisson_round_trip_real_image(astronaut64: torch.Tensor) -> None:
    x = astronaut64
    dc = _spatial_mean(x)
    err64 = (poisson_from_gradient(grad(x), dc) - x).abs().max().item()
    assert err64 <= 1e-10
    x32 = x.float()
    out32 = poisson_from_gradient(grad(x32), _spatial_mean(x32))
    assert out32.dtype == torch.float32
    assert (out32.double() - x).abs().max().item() <= 1e-4
    # Laplacian route, both stencils
    errl = (poisson_from_laplacian(laplacian(x), dc) - x).abs().max().item()
    assert errl <= 1e-10
    errq = (poisson_from_laplacian(laplacian(x, "5point_quarter"), dc, stencil="5point_quarter") - x).abs().max()
    assert errq.item() <= 1e-10
    out32l = poisson_from_laplacian(laplacian(x32), _spatial_mean(x32))
    assert (out32l.double() - x).abs().max().item() <= 1e-4


def test_poisson_uniqueness_up_to_constant() -> None:
    x = _randn(3, 2, 12, 12, seed=13)
    c = torch.tensor([0.7, -1.3], dtype=F64).view(1, 2, 1, 1)
    a = poisson_from_gradient(grad(x + c), 0.0)
    b = poisson_from_gradient(grad(x), 0.0)
    assert (a - b).abs().max() < 1e-12
    assert _spatial_mean(b).abs().max() < 1e-13
    dc = _randn(3, 2, seed=14)
    y = poisson_from_gradient(grad(x), dc)
    assert (_spatial_mean(y) - dc).abs().max() < 1e-13
    assert (y - (x - x.mean(dim=(-2, -1), keepdim=True) + dc[..., None, None])).abs().max() < 1e-11
    # per-channel dc of shape (C,) and a scalar
    assert (_spatial_mean(poisson_from_gradient(grad(x), dc[0])) - dc[0]).abs().max() < 1e-13
    assert (_spatial_mean(poisson_from_gradient(grad(x), 0.25)) - 0.25).abs().max() < 1e-13
    with pytest.raises(ValueError, match="broadcast"):
        poisson_from_gradient(grad(x), torch.zeros(5, dtype=F64))


def _dense_D(h: int, w: int) -> np.ndarray:
    """Dense matrix of grad() for one channel: (2HW, HW) with rows [u entries; v entries], row-major."""
    eye = np.eye(h * w).reshape(h * w, h, w)
    du, dv = _numpy_grad(eye)
    return np.concatenate([du.reshape(h * w, -1).T, dv.reshape(h * w, -1).T], axis=0)


def test_poisson_least_squares_on_non_integrable_field() -> None:
    h, w = 6, 7
    g = _randn(2, 2, h, w, seed=15)  # C = 1, random: not a gradient field
    assert curl(g).abs().max() > 0.1
    x = poisson_from_gradient(g, 0.0)
    # normal equations: Dᵀ(D x − g) = 0
    assert grad_adjoint(grad(x) - g).abs().max() < 1e-12
    # beats random candidates
    res = (grad(x) - g).flatten(1).norm(dim=1)
    for s in range(5):
        y = _randn(2, 1, h, w, seed=100 + s)
        assert (res <= (grad(y) - g).flatten(1).norm(dim=1)).all()
    # idempotent projection
    p1 = grad(x)
    p2 = grad(poisson_from_gradient(p1, 0.0))
    assert (p1 - p2).abs().max() < 1e-12
    # independent oracle: dense min-norm least squares (the min-norm solution has zero mean)
    dmat = _dense_D(h, w)
    for b in range(2):
        gv = np.concatenate([g[b, 0].numpy().ravel(), g[b, 1].numpy().ravel()])
        ref = np.linalg.lstsq(dmat, gv, rcond=None)[0].reshape(h, w)
        assert np.abs(x[b, 0].numpy() - ref).max() < 1e-10


def test_screened_poisson_against_dense_solve() -> None:
    h, w, mu = 5, 6, 2.0
    g = _randn(1, 2, h, w, seed=16)
    xi = _randn(1, 1, h, w, seed=17)
    out = screened_poisson(g, xi, mu)
    dmat = _dense_D(h, w)
    gv = np.concatenate([g[0, 0].numpy().ravel(), g[0, 1].numpy().ravel()])
    ref = np.linalg.solve(dmat.T @ dmat + mu * np.eye(h * w), dmat.T @ gv + mu * xi[0, 0].numpy().ravel())
    assert np.abs(out[0, 0].numpy().ravel() - ref).max() < 1e-12
    # consistent data is a fixed point; mean comes from x_img
    x = _randn(2, 3, 8, 8, seed=18)
    assert (screened_poisson(grad(x), x, 2.0) - x).abs().max() < 1e-12
    assert (_spatial_mean(out) - _spatial_mean(xi)).abs().max() < 1e-13
    with pytest.raises(ValueError, match="mu > 0"):
        screened_poisson(g, xi, 0.0)


def test_curl() -> None:
    x = _randn(2, 3, 10, 9, seed=19)
    assert curl(grad(x)).shape == (2, 3, 9, 8)
    assert curl(grad(x)).abs().max() < 1e-13
    noise = _randn(2, 6, 10, 9, seed=20)
    assert curl(noise).abs().mean() > 0.5
    # curl = 0 ⇔ LS residual = 0 (for fields with zero structural entries)
    g = grad(x)
    assert (grad(poisson_from_gradient(g, 0.0)) - g).abs().max() < 1e-12
    bad = g.clone()
    bad[:, :3, 4, 4] += 1.0
    assert curl(bad).abs().max() > 0.5
    assert (grad(poisson_from_gradient(bad, 0.0)) - bad).abs().max() > 0.1


def test_noise_statistics_monte_carlo() -> None:
    n, count = 32, 1000
    eps = _randn(count, 1, n, n, seed=21)
    g = grad(eps)
    du, dv = g[:, 0, :-1, :-1], g[:, 1, :-1, :-1]  # interior entries
    assert GRAD_NOISE_SCALE == pytest.approx(math.sqrt(2))
    assert du.std().item() == pytest.approx(GRAD_NOISE_SCALE, rel=0.01)
    assert dv.std().item() == pytest.approx(GRAD_NOISE_SCALE, rel=0.01)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    assert corr(g[:, 0, :, :-2], g[:, 0, :, 1:-1]) == pytest.approx(-0.5, abs=0.01)  # u, next along j
    assert corr(g[:, 1, :-2, :], g[:, 1, 1:-1, :]) == pytest.approx(-0.5, abs=0.01)  # v, next along i
    assert corr(du, dv) == pytest.approx(0.5, abs=0.01)  # u and v at the same pixel
    assert curl(g).abs().max() < 1e-12
    lap = laplacian(eps)[:, :, 1:-1, 1:-1]
    assert laplacian_noise_scale("5point") == pytest.approx(math.sqrt(20))
    assert lap.std().item() == pytest.approx(laplacian_noise_scale("5point"), rel=0.01)
    lapq = laplacian(eps, "5point_quarter")[:, :, 1:-1, 1:-1]
    assert laplacian_noise_scale("5point_quarter") == pytest.approx(math.sqrt(5) / 2)
    assert lapq.std().item() == pytest.approx(laplacian_noise_scale("5point_quarter"), rel=0.01)
    with pytest.raises(ValueError, match="stencil"):
        laplacian_noise_scale("9point")  # type: ignore[arg-type]


def test_equivalent_process_spectrum() -> None:
    # GDDM §2.10.8: DCT variance of poisson(s_g sqrt(1-γ) ε, 0) equals 2(1-γ)/λ_k for every k != 0.
    n, count, gamma = 32, 4000, 0.3
    s = GRAD_NOISE_SCALE * math.sqrt(1 - gamma)
    eps = _randn(count, 2, n, n, seed=22)
    xcoef = dct2(poisson_from_gradient(s * eps, 0.0))
    var = (xcoef**2).mean(dim=(0, 1))
    lam = neumann_eigenvalues(n, n)
    ratio = (var / (2 * (1 - gamma) / lam))
    ratio[0, 0] = 1.0
    assert var[0, 0].item() < 1e-20
    assert ratio.min().item() >= 0.9 and ratio.max().item() <= 1.1
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------------------------------------------
# Edge map and Perona–Malik (EPDM spec §1.2, §1.12.1)
# ------------------------------------------------------------------------------------------------------


def _step_image(n: int = 12, c: int = 3, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    x = torch.full((1, c, n, n), lo, dtype=F64)
    x[..., n // 2 :] = hi
    return x


def _scipy_edge(x: torch.Tensor, mode: str) -> np.ndarray:
    s = x.sum(dim=1).numpy()
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    ky = kx.T.copy()
    out = []
    for img in s:
        gx = scipy.ndimage.correlate(img, kx, mode=mode, cval=0.0)
        gy = scipy.ndimage.correlate(img, ky, mode=mode, cval=0.0)
        out.append(gx**2 + gy**2)
    return np.stack(out)[:, None]


def test_edge_map_step_image() -> None:
    n = 12
    x = _step_image(n)
    cols = [n // 2 - 1, n // 2]
    interior = [j for j in range(1, n - 1) if j not in cols]
    rep = edge_map(x, padding="replicate")
    assert rep.shape == (1, 1, n, n)
    assert torch.all(rep[0, 0][:, cols] == 1.0)
    assert torch.all(rep[0, 0][:, [j for j in range(n) if j not in cols]] == 0.0)
    zer = edge_map(x, padding="zeros")
    assert torch.all(zer[0, 0, 1:-1][:, cols] == 1.0)
    assert torch.all(zer[0, 0, 1:-1][:, interior] == 0.0)
    assert zer[0, 0, :, 0].min() > 0 and zer[0, 0, :, -1].min() > 0 and zer[0, 0, 0, :].min() > 0
    assert zer.min() >= 0 and zer.max() == 1.0
    # against scipy (zero = constant 0, replicate = nearest), unnormalised
    raw = edge_map(x, norm="none", padding="zeros").numpy()
    assert np.abs(raw - _scipy_edge(x, "constant")).max() < 1e-12
    raw_r = edge_map(x, norm="none", padding="replicate").numpy()
    assert np.abs(raw_r - _scipy_edge(x, "nearest")).max() < 1e-12
    # horizontal step too (checks the y kernel) on a random image
    y = _randn(2, 3, 9, 10, seed=30)
    assert np.abs(edge_map(y, norm="none").numpy() - _scipy_edge(y, "constant")).max() < 1e-12


def test_edge_map_channel_sum_and_constant_image() -> None:
    x = _randn(1, 3, 8, 8, seed=31)
    perm = x[:, [2, 0, 1]]
    assert torch.allclose(edge_map(x), edge_map(perm), rtol=1e-12, atol=1e-15)  # channel sum only
    # a constant image has no edges: 0, not the official 0/0 = NaN (zero padding: only the 0 image is flat)
    for const, pad in ((0.0, "zeros"), (0.3, "replicate"), (-0.7, "replicate")):
        for norm in ("image_max", "batch_max"):
            g = edge_map(torch.full((2, 3, 8, 8), const, dtype=F64), norm=norm, padding=pad)  # type: ignore[arg-type]
            assert torch.isfinite(g).all() and torch.all(g == 0)
    assert edge_map(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="norm"):
        edge_map(x, norm="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padding"):
        edge_map(x, padding="reflect")  # type: ignore[arg-type]


def test_edge_map_image_vs_batch_normalisation() -> None:
    strong = _step_image(10)
    weak = _step_image(10, lo=-0.25, hi=0.25)
    batch = torch.cat([strong, weak, _randn(1, 3, 10, 10, seed=32)])
    per_image = edge_map(batch, norm="image_max")
    for i in range(3):
        assert torch.equal(per_image[i : i + 1], edge_map(batch[i : i + 1], norm="image_max"))
        assert per_image[i].max() == 1.0
    per_batch = edge_map(batch, norm="batch_max")
    assert per_batch.max() == 1.0
    assert per_batch[1].max().item() == pytest.approx(0.25**2, rel=1e-12)  # (0.5/2)² of the strong step
    raw = edge_map(batch, norm="none")
    assert torch.allclose(per_batch, raw / raw.max(), rtol=1e-15, atol=0)


def test_perona_malik_limits() -> None:
    g = torch.linspace(0, 1, 11, dtype=F64)
    c = perona_malik(g, 0.1)
    assert c[0] == 1.0
    assert (c[1:] < c[:-1]).all()  # decreasing in the edge strength
    assert perona_malik(torch.tensor(0.1, dtype=F64), 0.1).item() == pytest.approx(1 / math.sqrt(2))
    assert torch.allclose(perona_malik(g, 1e12), torch.ones_like(g), atol=1e-12)  # λ → ∞: isotropic
    assert perona_malik(torch.tensor(1.0, dtype=F64), 1e-12).item() < 1e-5  # λ → 0: edges frozen
    lam = torch.tensor([[0.1], [1.0]], dtype=F64)
    assert perona_malik(g, lam).shape == (2, 11)
    with pytest.raises(ValueError, match="lam > 0"):
        perona_malik(g, 0.0)
