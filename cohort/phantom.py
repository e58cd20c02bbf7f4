"""The embedded default cohort "phantom-v1": real atlas anatomy, simulated tumours and contrasts.

What is real and what is simulated (docs/phantom.md says the same):
- REAL: the anatomy and the T1 image come from three published brain atlases (SRI24, MNI ICBM152 2009a,
  ANTs OASIS template; see cohort.atlases), including their own CSF/GM/WM tissue maps.
- SIMULATED: subject variation (random smooth warps, affine jitter, bias field, noise, contrast jitter),
  the tumours (reaction-diffusion growth over the tissue maps, split into edema / enhancing rim / necrotic
  core), and the T1CE, T2 and FLAIR contrasts (a per-tissue intensity model, ``CONTRAST`` below).

Every case is made in one resampling from the 1-mm atlas: output voxel -> random affine -> smooth warp ->
atlas space -> optional tumour mass effect, so image, tissue maps and tumour stay aligned and any
profile (tiny, demo, paper-brats at 1 mm) shows the same subject for the same seed. The tumour is grown
once per case on a coarse 3-mm grid in atlas space (the expensive part), then sampled like the anatomy.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .atlases import ATLAS_INFO, ATLAS_NAMES, Atlas, copy_licence_texts, load_atlas
from core.errors import InputError, ConfigError
from core.fsutil import atomic_write_text
from .labels import BRAIN, ED, ET, MODALITIES, NCR, tumour_slice
from .profiles import Profile, get_profile

COHORT_NAME = "phantom-v1"
BUILDER_VERSION = 1
# Brains are scaled (never enlarged) to at most this x/y extent so every atlas fits the demo field of
# view (144 x 180 x 144 mm) with a margin; the same physical scale is used for every profile.
MAX_BRAIN_XY_MM = (132.0, 165.0)
SIM_SPACING_MM = 3  # tumour growth grid (in atlas space)

# Relative intensities, white matter = 1. None = taken from the atlas's real T1 (T1 and the T1 part of
# T1CE). Directions follow BraTS appearance: edema bright on T2/FLAIR, enhancing rim bright on T1CE,
# necrosis dark on T1/T1CE and bright on T2, CSF bright on T2 and dark (suppressed) on FLAIR.
CONTRAST: dict[str, dict[str, float | None]] = {
    "t1":    dict(csf=None, gm=None, wm=None, ed=0.75, et=0.85, ncr=0.45),
    "t1ce":  dict(csf=None, gm=None, wm=None, ed=0.80, et=1.80, ncr=0.50),
    "t2":    dict(csf=2.60, gm=1.35, wm=1.00, ed=2.00, et=1.70, ncr=2.40),
    "flair": dict(csf=0.35, gm=1.20, wm=1.00, ed=2.00, et=1.60, ncr=1.10),
}
# Subject-variation ranges (documented in docs/phantom.md).
VARIATION = dict(rotation_deg=7.0, scale_global=0.05, scale_axis=0.03, translation_mm=3.0,
                 warp_control_mm=30.0, warp_std_mm=2.5, contrast_jitter=0.06, bias_coeff=0.12,
                 rician_std=0.03, gamma=(0.85, 1.15))
# Growth in grid units (3-mm voxels, unit time): front width sqrt(D/rho) is ~2-3 mm in white matter and
# 10x thinner in grey matter (diffusivity ratio 10, as in Swanson-type glioma models).
TUMOUR = dict(wt_ml=(6.0, 110.0), rho=(0.3, 0.7), d_wm=0.25, d_gm=0.025, dt=0.5, theta_ed=(0.005, 0.03),
              theta_tc=(0.35, 0.6), theta_ncr=(0.8, 0.92), p_necrosis=0.8, p_mass_effect=0.5,
              mass_effect=(0.15, 0.35), heterogeneity=0.2)


def profile_affine(profile: Profile) -> np.ndarray:
    """RAS+ affine of a profile's grid, centred on world (0, 0, 0). Every phantom case shares it."""
    aff = np.diag([*profile.spacing, 1.0])
    aff[:3, 3] = -(np.asarray(profile.shape) - 1) / 2 * np.asarray(profile.spacing)
    return aff


@dataclass(frozen=True)
class _Prepared:
    """An atlas ready for sampling at one output spacing, plus its tumour-growth grid."""

    atlas: Atlas
    channels: np.ndarray        # (5, X, Y, Z): t1, csf, gm, wm, brain - anti-alias blurred for the spacing
    inv_affine: np.ndarray      # world -> atlas voxel
    centre_mm: np.ndarray       # world centre of the brain box (+3 mm up: keeps the vertex inside the FOV)
    size_scale: float           # <= 1, normalises brain size
    sim_d: np.ndarray           # diffusivity on the 3-mm grid (WM fast, GM slow, 0 in CSF/outside)
    sim_inv_affine: np.ndarray  # world -> 3-mm grid voxel
    sim_affine: np.ndarray
    seeds: np.ndarray           # (K, 3) candidate seed voxels on the 3-mm grid


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    s = [n // f * f for n in a.shape]
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _block_affine(f: int) -> np.ndarray:
    """Voxel map of a grid block-averaged by f: new voxel i covers old voxels f*i .. f*i+f-1."""
    return np.array([[f, 0, 0, (f - 1) / 2], [0, f, 0, (f - 1) / 2], [0, 0, f, (f - 1) / 2], [0, 0, 0, 1.0]])


@functools.lru_cache(maxsize=8)
def _prepare(name: str, spacing: tuple[float, float, float], cache: str | None) -> _Prepared:
    atlas = load_atlas(name, cache)
    chans = np.concatenate([atlas.t1[None], atlas.tissue, atlas.brain[None].astype(np.float32)])
    # anti-aliasing before sampling at a coarser grid: block-average by an integer factor (cheap), then a
    # Gaussian for the rest of the way (no blur at all for 1-mm output)
    f_ds = max(1, int(min(spacing) // 2))
    work_affine = atlas.affine
    if f_ds > 1:
        chans = np.stack([_block_mean(c, f_ds) for c in chans])
        work_affine = atlas.affine @ _block_affine(f_ds)
    sig = 0.4 * np.sqrt(np.maximum(np.asarray(spacing) ** 2 - f_ds ** 2, 0.0)) / f_ds
    if np.any(sig > 0.05):
        chans = np.stack([ndimage.gaussian_filter(c, sig) for c in chans])
    lo, hi = atlas.brain_box_mm()
    centre = (lo + hi) / 2 + np.array([0.0, 0.0, 3.0])
    ext = hi - lo
    size_scale = float(min(1.0, MAX_BRAIN_XY_MM[0] / ext[0], MAX_BRAIN_XY_MM[1] / ext[1]))
    f = SIM_SPACING_MM
    tis3 = np.stack([_block_mean(t, f) for t in atlas.tissue])
    brain3 = _block_mean(atlas.brain.astype(np.float32), f) > 0.5
    d = np.where(brain3, TUMOUR["d_wm"] * tis3[2] + TUMOUR["d_gm"] * tis3[1], 0.0).astype(np.float32)
    sim_aff = atlas.affine @ _block_affine(f)
    seeds = np.argwhere(_block_mean(atlas.seed_ok.astype(np.float32), f) > 0.99)
    return _Prepared(atlas, chans.astype(np.float32), np.linalg.inv(work_affine), centre, size_scale,
                     d, np.linalg.inv(sim_aff), sim_aff, seeds)


def grow_tumour(diffusivity: np.ndarray, seed: tuple[int, int, int], rho: float, target_voxels: int,
                threshold: float, dt: float = 0.5, max_steps: int = 1500,
                init_radius: float = 2.0) -> tuple[np.ndarray, int]:
    """Fisher-KPP reaction-diffusion u_t = div(D grad u) + rho u (1 - u), explicit finite differences.

    Hand-written with numpy (no library in our stack simulates tumour growth). D is high in white matter,
    low in grey matter and zero in CSF/outside the brain (no-flux there: harmonic-mean face diffusivity),
    so the tumour infiltrates preferentially along white matter. Stops when ``target_voxels`` voxels exceed
    ``threshold`` (or after ``max_steps``). Stable for dt * 6 * max(D) < 1. Returns (u, steps).
    """
    d = diffusivity.astype(np.float32)
    faces = []
    for ax in range(3):
        a = np.take(d, range(d.shape[ax] - 1), axis=ax)
        b = np.take(d, range(1, d.shape[ax]), axis=ax)
        faces.append(np.where(a + b > 0, 2 * a * b / np.maximum(a + b, 1e-12), 0).astype(np.float32))
    live = d > 0
    # initial lesion: a saturated ball of radius ~2 voxels (a point seed would first smear out and only
    # saturate much later, leaving no tumour core)
    idx = np.indices(d.shape, dtype=np.float32)
    r2 = sum((idx[a] - seed[a]) ** 2 for a in range(3))
    u = ((r2 <= init_radius ** 2) & live).astype(np.float32)
    for step in range(1, max_steps + 1):
        div = np.zeros_like(u)
        for ax in range(3):
            flux = faces[ax] * np.diff(u, axis=ax)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(0, -1)
            hi[ax] = slice(1, None)
            div[tuple(lo)] += flux
            div[tuple(hi)] -= flux
        u += dt * (div + rho * u * (1 - u))
        u *= live
        if step % 4 == 0 and int((u > threshold).sum()) >= target_voxels:
            return u, step
    return u, max_steps


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return n / max(float(n.std()), 1e-6)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class CaseInfo:
    """What was drawn for one case (written to phantom.json for provenance)."""

    case_id: str
    atlas: str
    seed_mm: list
    rho: float
    target_wt_ml: float
    wt_ml: float
    growth_steps: int
    thresholds: list
    necrosis: bool
    mass_effect: float


@dataclass
class SimulatedCase:
    images: dict[str, np.ndarray]  # modality -> float32 (X, Y, Z), 0 outside the brain, white matter ~1
    label: np.ndarray              # uint8, 0 bg, 1 NCR, 2 ED, 3 ET, 4 brain
    tissue: np.ndarray             # (3, X, Y, Z) CSF/GM/WM fractions of the atlas anatomy (for tests/plots)
    info: CaseInfo


@dataclass(frozen=True)
class _Draws:
    """Everything random about one case, drawn from its stream in a fixed order that does not depend on the
    profile (so one seed gives the same subject at every resolution)."""

    rotation: np.ndarray    # 3x3
    scale: np.ndarray       # (3,) global x per-axis
    shift_mm: np.ndarray    # (3,)
    warp_ctrl: np.ndarray   # (3, *control grid) displacements in mm
    rho: float
    target_ml: float
    th_ed: float
    th_tc: float
    necrosis: bool
    th_ncr: float           # 2.0 (never reached) without necrosis
    mass_effect: float      # 0.0 = no mass effect
    jitter: dict            # modality -> tissue/tumour class -> contrast factor
    het_seed: int
    monai_seed: int
    seed_order: np.ndarray  # order in which the atlas's candidate tumour seeds are tried


def _draw(rng: np.random.Generator, n_seeds: int) -> _Draws:
    v, t = VARIATION, TUMOUR
    rot = _rotation(rng, v["rotation_deg"])
    scale = (1 + rng.uniform(-v["scale_global"], v["scale_global"])) * \
        (1 + rng.uniform(-v["scale_axis"], v["scale_axis"], 3))
    shift = rng.uniform(-v["translation_mm"], v["translation_mm"], 3)
    ctrl_shape = tuple(int(np.ceil(e / v["warp_control_mm"])) + 3 for e in (192.0, 216.0, 192.0))
    ctrl = rng.normal(0, v["warp_std_mm"], (3, *ctrl_shape))
    rho = float(rng.uniform(*t["rho"]))
    target_ml = float(np.exp(rng.uniform(*np.log(t["wt_ml"]))))
    th_ed, th_tc = float(rng.uniform(*t["theta_ed"])), float(rng.uniform(*t["theta_tc"]))
    necrosis = bool(rng.random() < t["p_necrosis"] and target_ml > 20)
    th_ncr = float(rng.uniform(*t["theta_ncr"])) if necrosis else 2.0
    mass = float(rng.uniform(*t["mass_effect"])) if rng.random() < t["p_mass_effect"] else 0.0
    jitter = {m: {k: float(np.exp(rng.normal(0, v["contrast_jitter"]))) for k in CONTRAST[m]} for m in MODALITIES}
    het_seed, monai_seed = int(rng.integers(2**31)), int(rng.integers(2**31))
    seed_order = rng.permutation(n_seeds)
    return _Draws(rot, scale, shift, ctrl, rho, target_ml, th_ed, th_tc, necrosis, th_ncr, mass, jitter, het_seed,
                  monai_seed, seed_order)


@dataclass(frozen=True)
class _Tumour:
    """A case's tumour, grown on the 3-mm grid in atlas space."""

    u: np.ndarray          # cell density in [0, 1], with heterogeneity
    het: np.ndarray        # the smooth noise field that made it patchy (also textures the tumour's intensities)
    steps: int
    seed_mm: np.ndarray
    centre_mm: np.ndarray  # centre of the tumour core (the seed if there is no core)
    radius_mm: float       # radius of a ball of the core's volume (at least 5 mm)


def _grow_case_tumour(prep: _Prepared, d: _Draws) -> _Tumour:
    t = TUMOUR
    vox_ml = SIM_SPACING_MM ** 3 / 1000.0
    for attempt in range(5):  # a seed whose tumour never forms a core is replaced by the next candidate
        seed = prep.seeds[d.seed_order[attempt]]
        u, steps = grow_tumour(prep.sim_d, tuple(seed), d.rho, int(d.target_ml / vox_ml), d.th_ed, dt=t["dt"])
        if (u > d.th_tc).sum() >= 2:
            break
    het = _smooth_noise(np.random.default_rng(d.het_seed), u.shape, 1.5)
    u = np.clip(u * (1 + t["heterogeneity"] * het), 0, 1)  # irregular borders and a patchy core
    seed_mm = (prep.sim_affine @ np.r_[seed, 1])[:3]
    core = np.argwhere(u > d.th_tc)
    centre_mm = (prep.sim_affine @ np.r_[core.mean(0), 1])[:3] if len(core) else seed_mm
    radius_mm = max(float((len(core) * vox_ml * 1000 * 3 / (4 * np.pi)) ** (1 / 3)), 5.0)
    return _Tumour(u, het, steps, seed_mm, centre_mm, radius_mm)


def _atlas_points(prep: _Prepared, profile: Profile, d: _Draws, tumour: _Tumour) -> np.ndarray:
    """The one coordinate map (3, X, Y, Z): output voxel -> random affine -> smooth warp -> atlas world (mm)
    -> optional mass effect about the tumour."""
    v = VARIATION
    aff_out = profile_affine(profile)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in profile.shape], indexing="ij"))
    world = np.tensordot(aff_out[:3, :3], grid, 1) + aff_out[:3, 3, None, None, None]
    q = np.tensordot(d.rotation * d.scale[None, :], world, 1) + d.shift_mm[:, None, None, None]
    # smooth warp: random displacements on a 30-mm control grid, cubic-interpolated
    cidx = (world + np.array([96.0, 108.0, 96.0])[:, None, None, None]) / v["warp_control_mm"] + 1
    q = q + np.stack([ndimage.map_coordinates(c, cidx, order=3, mode="nearest") for c in d.warp_ctrl])
    p = prep.centre_mm[:, None, None, None] + q / prep.size_scale
    if d.mass_effect > 0:  # expansion about the tumour centre: sample closer to it (|dm/dr| < 1 keeps it invertible)
        r = p - tumour.centre_mm[:, None, None, None]
        sigma = 1.5 * tumour.radius_mm
        p = p - d.mass_effect * r * np.exp(-(r ** 2).sum(0) / (2 * sigma ** 2))
    return p


@dataclass(frozen=True)
class _Sampled:
    """The atlas channels and the tumour sampled on the output grid."""

    t1: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain_f: np.ndarray  # brain fraction (blurred at the edge)
    u: np.ndarray        # tumour cell density
    het: np.ndarray      # the tumour's heterogeneity field


def _sample(prep: _Prepared, tumour: _Tumour, p: np.ndarray) -> _Sampled:
    vox = np.tensordot(prep.inv_affine[:3, :3], p, 1) + prep.inv_affine[:3, 3, None, None, None]
    t1, csf, gm, wm, brain_f = (ndimage.map_coordinates(c, vox, order=1, mode="constant", cval=0.0)
                                for c in prep.channels)
    svox = np.tensordot(prep.sim_inv_affine[:3, :3], p, 1) + prep.sim_inv_affine[:3, 3, None, None, None]
    uo = ndimage.map_coordinates(tumour.u, svox, order=1, mode="constant", cval=0.0)
    het = ndimage.map_coordinates(tumour.het, svox, order=1, mode="nearest")
    return _Sampled(t1, csf, gm, wm, brain_f, uo, het)


def _label_map(brain: np.ndarray, u: np.ndarray, d: _Draws) -> np.ndarray:
    label = np.zeros(brain.shape, np.uint8)
    label[brain] = BRAIN
    label[brain & (u > d.th_ed)] = ED
    label[brain & (u > d.th_tc)] = ET
    label[brain & (u > d.th_ncr)] = NCR
    return label


def _ramp(u: np.ndarray, th: float) -> np.ndarray:
    # soft threshold (0 below 0.8 th, 1 above 1.2 th): partial-volume tumour borders, so the intensities
    # do not copy the label map, and exactly 0 away from the tumour
    return np.clip((u - 0.8 * th) / (0.4 * th), 0.0, 1.0)


def _contrast_images(prep: _Prepared, s: _Sampled, tis: np.ndarray, brain: np.ndarray,
                     d: _Draws) -> dict[str, np.ndarray]:
    """The per-tissue contrast model (``CONTRAST`` with the case's jitter) on the sampled anatomy and tumour."""
    mu_t1 = np.asarray(prep.atlas.t1_means, np.float32)
    t1_norm = np.where(brain, s.t1 / np.maximum(s.brain_f, 1e-3), 0)  # undo the brain-edge blur of the intensity
    expected_t1 = np.tensordot(mu_t1, tis, 1)
    texture = np.clip(t1_norm / np.maximum(expected_t1, 1e-3), 0.6, 1.4) ** -0.5  # real fine structure
    f_wt, f_tc = _ramp(s.u, d.th_ed), np.minimum(_ramp(s.u, d.th_tc), _ramp(s.u, d.th_ed))
    f_ncr = np.minimum(_ramp(s.u, d.th_ncr), f_tc) if d.necrosis else np.zeros_like(s.u)
    fr = {"ed": f_wt - f_tc, "et": f_tc - f_ncr, "ncr": f_ncr}
    images = {}
    for m in MODALITIES:
        c, j = CONTRAST[m], d.jitter[m]
        if c["wm"] is None:  # real T1 anatomy, per-tissue contrast jitter via the tissue fractions
            normal = t1_norm * np.tensordot(np.array([j["csf"], j["gm"], j["wm"]], np.float32), tis, 1)
        else:
            mus = np.array([c["csf"] * j["csf"], c["gm"] * j["gm"], c["wm"] * j["wm"]], np.float32)
            normal = np.tensordot(mus, tis, 1) * texture
        img = (1 - f_wt) * normal
        for k in ("ed", "et", "ncr"):
            img = img + fr[k] * c[k] * j[k] * (1 + 0.08 * s.het)
        images[m] = np.where(brain, img, 0).astype(np.float32)
    return images


def _acquire(images: dict[str, np.ndarray], brain: np.ndarray, monai_seed: int) -> dict[str, np.ndarray]:
    """Acquisition: MONAI intensity transforms (one bias field for all sequences: it is the coil's), then
    skull-stripped like BraTS."""
    from monai.transforms import RandAdjustContrast, RandBiasField, RandRicianNoise

    v = VARIATION
    stack = np.stack([images[m] for m in MODALITIES])
    bias = RandBiasField(degree=3, coeff_range=(0.0, v["bias_coeff"]), prob=1.0)
    bias.set_random_state(seed=monai_seed)
    stack = np.asarray(bias(stack), np.float32)
    out = {}
    for i, m in enumerate(MODALITIES):
        gamma = RandAdjustContrast(prob=1.0, gamma=v["gamma"])
        gamma.set_random_state(seed=monai_seed + 1 + i)
        noise = RandRicianNoise(prob=1.0, std=v["rician_std"], sample_std=False)
        noise.set_random_state(seed=monai_seed + 11 + i)
        x = np.asarray(gamma(stack[i][None]), np.float32)
        x = np.asarray(noise(x), np.float32)[0]
        out[m] = np.where(brain, np.clip(x, 0, None), 0).astype(np.float32)
    return out


def simulate_case(atlas_name: str, profile: Profile, rng: np.random.Generator, case_id: str = "case",
                  cache: str | None = None) -> SimulatedCase:
    """One phantom subject on ``profile``'s grid.

    All random draws come from ``rng`` in a fixed order that does not depend on the profile, so one seed
    gives the same subject (anatomy, tumour) at every resolution; only the voxel noise differs.
    """
    prep = _prepare(atlas_name, tuple(float(s) for s in profile.spacing), cache)
    d = _draw(rng, len(prep.seeds))
    tumour = _grow_case_tumour(prep, d)
    sampled = _sample(prep, tumour, _atlas_points(prep, profile, d, tumour))
    brain = sampled.brain_f > 0.5
    label = _label_map(brain, sampled.u, d)
    tis = np.stack([sampled.csf, sampled.gm, sampled.wm])
    tis = tis / np.maximum(tis.sum(0), 1e-6)
    images = _acquire(_contrast_images(prep, sampled, tis, brain, d), brain, d.monai_seed)
    vox_ml_out = float(np.prod(profile.spacing)) / 1000.0
    info = CaseInfo(case_id, atlas_name, [round(float(x), 1) for x in tumour.seed_mm], round(d.rho, 4),
                    round(d.target_ml, 2), round(float(np.isin(label, (NCR, ED, ET)).sum() * vox_ml_out), 2),
                    int(tumour.steps), [round(d.th_ed, 4), round(d.th_tc, 4), round(d.th_ncr, 4)], d.necrosis,
                    round(d.mass_effect, 3))
    return SimulatedCase(images, label, tis.astype(np.float32), info)


def split_assignment(n_cases: int, seed: int) -> list[str]:
    """Fixed splits by seed: 25 % test, 12.5 % val, the rest train (48 cases -> 30 / 6 / 12)."""
    n_test, n_val = int(round(0.25 * n_cases)), int(round(0.125 * n_cases))
    order = np.random.default_rng(np.random.SeedSequence([seed, 999_999])).permutation(n_cases)
    splits = ["train"] * n_cases
    for k, i in enumerate(order):
        splits[i] = "test" if k < n_test else ("val" if k < n_test + n_val else "train")
    return splits


def case_id_for(i: int) -> str:
    return f"phantom_{i:03d}"


def build_phantom_cohort(out_dir: str | Path, n_cases: int = 48, seed: int = 0, profile: str = "demo",
                         atlases: tuple[str, ...] = ATLAS_NAMES, progress: bool = True,
                         cache: str | None = None) -> Path:
    """Build (or resume) the phantom cohort in ``out_dir``; return its data_manifest.csv.

    Case i uses atlas ``atlases[i % len(atlases)]`` and the random stream SeedSequence([seed, i]), so the
    same seed gives identical files. Cases already in the manifest are kept (resumable); a folder built
    with other settings is refused.
    """
    from tqdm import tqdm

    from .manifest import append_rows, load_manifest, make_row
    from .nifti import write_array

    prof = get_profile(profile)
    for a in atlases:
        if a not in ATLAS_INFO:
            raise ConfigError(f"unknown atlas {a!r}; known: {list(ATLAS_INFO)}", kind="bad-atlas")
    if n_cases < 1:
        raise ConfigError(f"n_cases must be >= 1, got {n_cases}", kind="bad-argument")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "data_manifest.csv"
    settings = dict(cohort=COHORT_NAME, builder_version=BUILDER_VERSION, n_cases=n_cases, seed=seed,
                    profile=prof.name, atlases=list(atlases))
    meta_path = out / "phantom.json"
    done: set[str] = set()
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("settings") != settings:
            raise InputError(meta_path, f"folder was built with other settings {old.get('settings')}; "
                                         f"use a new --out folder", kind="settings-mismatch")
        if manifest.exists():
            done = set(load_manifest(manifest)["case_id"])
    elif manifest.exists():
        raise InputError(manifest, "a manifest exists but no phantom.json: not a phantom folder; use a new --out",
                          kind="settings-mismatch")
    meta = {"settings": settings, "cases": {}}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    splits = split_assignment(n_cases, seed)
    aff = profile_affine(prof)
    todo = [i for i in range(n_cases) if case_id_for(i) not in done]
    for i in tqdm(todo, desc=f"phantom {prof.name}", unit="case", disable=not progress):
        cid = case_id_for(i)
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        case = simulate_case(atlases[i % len(atlases)], prof, rng, cid, cache)
        images, label, info = case.images, case.label, case.info
        paths = {m: write_array(out / cid / f"{cid}_{m}.nii.gz", images[m], aff) for m in prof.modalities}
        lpath = write_array(out / cid / f"{cid}_seg.nii.gz", label, aff)
        row = make_row(manifest, case_id=cid, cohort=COHORT_NAME, source="real", split=splits[i], images=paths,
                       label=lpath, shape=prof.shape, spacing=prof.spacing, atlas=info.atlas,
                       tumour_ml=f"{info.wt_ml:.2f}")
        meta["cases"][cid] = asdict(info)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        append_rows(manifest, [row])
    licences = copy_licence_texts(out, cache)
    atomic_write_text(out / "README.txt", provenance_text() + "\nLicence texts: "
                      + ", ".join(p.name for p in licences) + "\n")
    return manifest


def provenance_text() -> str:
    """The honesty statement every report built on this cohort should repeat."""
    lines = [f"{COHORT_NAME}: anatomy and T1 images are REAL atlas data; tumours, subject variation and the "
             f"T1CE, T2 and FLAIR contrasts are SIMULATED (cohort/phantom.py, docs/phantom.md).", "Atlases:"]
    for name, info in ATLAS_INFO.items():
        lines.append(f"- {name}: {info['title']}. {info['citation']} Licence: {info['licence']}.")
    return "\n".join(lines) + "\n"


LABEL_COLOURS = {NCR: (0.9, 0.1, 0.1), ED: (0.1, 0.8, 0.2), ET: (1.0, 0.85, 0.0)}


def montage(manifest: str | Path, out_png: str | Path, case_ids: list[str] | None = None, n_cases: int = 4,
            title: str | None = None) -> Path:
    """PNG montage: one row per case, columns T1, T1CE, T2, FLAIR and FLAIR with the label overlay.

    Shows the axial slice through the tumour's centre (or the middle slice). Reusable by eval.report.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from core.fsutil import atomic_path
    from .manifest import load_manifest, read_case

    df = load_manifest(manifest)
    if case_ids is None:
        case_ids = df["case_id"].tolist()[:n_cases]
    rows = [df[df["case_id"] == c].iloc[0] for c in case_ids]
    cols = [m for m in MODALITIES]
    fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(2.2 * (len(cols) + 1), 2.5 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        case = read_case(manifest, row)
        vol, lab = case.image, case.label_map
        z = tumour_slice(lab)
        names = [m for m in cols if m in vol.channels]
        for c, m in enumerate(names):
            sl = vol.channel(m)[:, :, z]
            vmax = np.percentile(vol.channel(m)[lab > 0], 99.5) if (lab > 0).any() else sl.max()
            axes[r, c].imshow(sl.T, origin="lower", cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            axes[r, c].set_title(f"{row['case_id']} {m}" if c == 0 else m, fontsize=8)
        base = vol.channel("flair" if "flair" in vol.channels else names[0])[:, :, z]
        ax = axes[r, len(cols)]
        ax.imshow(base.T, origin="lower", cmap="gray", interpolation="nearest",
                  vmin=0, vmax=np.percentile(base, 99.5) if base.any() else 1)
        rgba = np.zeros((*lab.shape[:2], 4))
        for k, col in LABEL_COLOURS.items():
            rgba[lab[:, :, z] == k] = (*col, 0.6)
        ax.imshow(rgba.transpose(1, 0, 2), origin="lower", interpolation="nearest")
        ax.set_title("labels", fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.legend(handles=[Patch(color=LABEL_COLOURS[k], label=n) for k, n in ((NCR, "NCR"), (ED, "ED"), (ET, "ET"))],
               loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title or f"{COHORT_NAME}: real atlas anatomy + simulated tumours/contrasts", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
