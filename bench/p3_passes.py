"""How much of a poison P3 keeps when the stage-2 model reconstructs it more than once (issue 17).

A rate-capped VAE keeps a share of a small perturbation along with the image. If its
reconstruction x_hat() acts on the perturbation like a contraction while an image it already
reconstructed is nearly a fixed point, then x_hat(x_hat(x2)) keeps less of the poison at little
cost to the image (it does not: docs/RESULTS.md, "Why TAP stays"). This probe trains a
preset's two stages in process on ROWS poisoned training rows (P1 = x0 - p_hat1(x0), stage 2
on P1, P2 = x1 - p_hat2(x1), z = mu, as the pipeline forms them), runs the same stages on
the clean originals of those rows and of HELD
others, and after k = 1..PASSES reconstructions of P2 reports, against the clean originals:
- kept: the share of the poison the output keeps (the purification trace's measure:
  <P3 - clean, delta> / <delta, delta>);
- response: the same for the purifier's own output on the clean rows, P3(poisoned) -
  P3(clean), which leaves out what the purifier does to a clean image (its blur);
- p3_db / clean_p3_db: PSNR of P3 of the poisoned and of the clean rows.
JPEG-10 of the same rows, measured the same way, is the first row: the baseline that the
CPU-protocol table compares D-VAE with. `--extrapolate G,...` adds P3 = x_hat + g (x_hat - x2),
the first pass's change from x2 taken 1 + g times; `--shift-average` adds the mean of x_hat
over the encoder's four pixel phases and a flip (it keeps as much of TAP as one pass:
docs/RESULTS.md). `--bands` also writes, for JPEG-10 and one pass, the same measures per
band of spatial frequency (the poison's and the images' spectra, and what share of each
band of the poison and of the clean image the purifier passes), to p3_passes-...-bands.
`--quantize STEP,...` decodes z = mu rounded to a grid of STEP posterior std, `--dead-zone
WIDTH,...` z = 0 where mu is within WIDTH posterior std of zero (JPEG's quantiser and its
dead zone, in the latent: neither is a better trade, docs/RESULTS.md).
`--sample` decodes z drawn from the posterior, as the authors purify.
`--restore T,...` puts x2's values back where x_hat misses them by T/255 or more (TAP
comes back with them as fast as the image: docs/RESULTS.md).
`--train-on clean` trains both stages on the rows' clean originals instead (no defender
has them): whether the purifier passes a poison because it learned it from the poisoned
rows it was trained on. `--train-noise S` trains stage 2 as a denoiser (its input plus
Gaussian noise of std S/255, Eq. 14's targets the clean input): more selective by band,
but no better a trade for the classifier (docs/RESULTS.md, "A denoising stage 2").
`--train-adv R` trains stage 2 on each batch moved, within an l_inf ball of R/255, to where
its reconstruction errs most; `--jpeg-input Q` has stage 2 read JPEG-Q of its rows and
reconstruct the rows themselves (neither is a better trade: docs/RESULTS.md, "An
adversarially trained stage 2"). `--train-moved DIR` has stage 2 read its rows moved as
DIR moves the poisoned rows, DIR being the poisoned set attacked once more with TAP, whose
surrogate the defender trains on the poisoned rows: a classifier that learned the poison's
shortcut is most sensitive along it, so its adversarial directions are the kind of
perturbation that stage 2 then learns to leave out, whatever the attack was (on TAP, no
better a trade either: docs/RESULTS.md, "A stage 2 that learns to leave out a poisoned
classifier's adversarial directions").
`--save DIR` writes each P3 of the
training rows (DIR/p3-poisoned-K and DIR/p3-clean-K after K passes; -phases, -qSTEP,
-dzWIDTH, -sampled, -rT and -xG for the averaged, rounded, dead-zoned, sampled, restored and
extrapolated P3s) for
bench/poison_dose.py and `raypurify train`.

    raypurify datasets export cifar10 --subset 3500 --seed 0 --out clean3500
    raypurify poison --attack tap --ratio 1.0 --data clean3500 --out tap3500 --set steps=20 \
        --set restarts=1 --set surrogate_recipe=cpu --set 'surrogate_overrides=[epochs=10]'
    python bench/p3_passes.py --poison tap3500 --clean clean3500 --passes 3 --save p3

Results: bench/results/p3_passes-<poison dir name>[-<label>][-<cpu kind>].{json,md}, and with
--bands p3_passes-<poison dir name>[-<label>]-bands[-<cpu kind>].{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import in_process as ip  # noqa: E402
from common import write_results  # noqa: E402
from p3_forms import (  # noqa: E402
    PosteriorSample,
    dead_zoned,
    from_latent,
    phase_average,
    quantized,
    restored,
)

from raypurify.data.imageset import ImageSet  # noqa: E402
from raypurify.data.interchange import read_images, write_images  # noqa: E402
from raypurify.defenses.squeeze import JpegOptions, jpeg  # noqa: E402
from raypurify.experiments.trace import psnr, radial_frequency, share_kept  # noqa: E402

# Radial bands of spatial frequency (cycles per image) for --bands; 32-px images reach 16
# along an axis, and the last band (labelled 12-16) also holds the corners beyond, to 16 * 2**0.5.
BANDS = ((0, 2), (2, 4), (4, 8), (8, 12), (12, 23))
CHUNK = 2000  # rows --bands transforms at once: five complex spectra of 2,000 rows are 0.5 GB


def band_rows(
    name: str, delta: np.ndarray, clean: np.ndarray, out_p: np.ndarray, out_c: np.ndarray
) -> list[dict]:
    """Per band of spatial frequency: the share of the poison's energy and of the clean
    images' energy (each image's mean removed) in the band; `response`, the share of the
    poison's band that the purifier's own change passes (<F(out_p - out_c), F(delta)> /
    <F(delta), F(delta)>, as p3_passes' response, within the band); `image`, the same for
    the clean image's band (<F(out_c), F(clean)> / <F(clean), F(clean)>). Every measure is
    a ratio of sums over rows, summed a chunk of rows at a time: the spectra of 45,000
    rows at once would take 11 GB."""

    def spectrum(x: np.ndarray) -> np.ndarray:
        return np.fft.fft2(x.astype(np.float64), axes=(1, 2))

    size = delta.shape[1]
    radius = radial_frequency(size, size)
    masks = [(radius >= lo) & (radius < hi) for lo, hi in BANDS]
    # Per band: poison energy, clean energy (mean removed), clean energy (with its mean),
    # the purifier's change against the poison, its clean output against the clean image.
    sums = np.zeros((len(BANDS), 5))
    for i in range(0, len(delta), CHUNK):
        rows = slice(i, i + CHUNK)
        c = clean[rows].astype(np.float64)
        fd, fc = spectrum(delta[rows]), spectrum(c - c.mean(axis=(1, 2), keepdims=True))
        fr = spectrum(out_p[rows].astype(np.float64) - out_c[rows])
        fo, fc_dc = spectrum(out_c[rows]), spectrum(c)
        terms = (
            np.abs(fd) ** 2,
            np.abs(fc) ** 2,
            np.abs(fc_dc) ** 2,
            (fr * fd.conj()).real,
            (fo * fc_dc.conj()).real,
        )
        for b, band in enumerate(masks):
            sums[b] += [np.sum(t * band) for t in terms]
    energy_d, energy_c, energy_c_dc, cross_d, cross_c = sums.T
    return [
        {
            "purifier": name,
            "band": f"{lo}-{min(hi, size // 2)} cycles",
            "poison_share": float(energy_d[b] / energy_d.sum()),
            "image_share": float(energy_c[b] / energy_c.sum()),
            "response": float(cross_d[b] / energy_d[b]),
            "image": float(cross_c[b] / energy_c_dc[b]),
        }
        for b, (lo, hi) in enumerate(BANDS)
    ]


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers (an option's value)."""
    return [float(v) for v in text.split(",")]


def main() -> None:
    ap = ip.probe_parser(__doc__)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument(
        "--extrapolate",
        type=floats,
        default=[],
        help="also form P3 = x_hat + g (x_hat - x2) for each g (comma-separated)",
    )
    ap.add_argument(
        "--shift-average",
        action="store_true",
        help="also form P3 as the mean of x_hat over the encoder's four pixel phases and flips",
    )
    ap.add_argument(
        "--quantize",
        type=floats,
        default=[],
        help="also form P3 = x_hat with z = mu rounded to STEP posterior std (comma-separated)",
    )
    ap.add_argument(
        "--dead-zone",
        type=floats,
        default=[],
        help="also form P3 = x_hat with z = 0 where |mu| < WIDTH posterior std, else mu "
        "(comma-separated)",
    )
    ap.add_argument(
        "--restore",
        type=floats,
        default=[],
        help="also form P3 = x_hat plus x2 - x_hat wherever that is at least T/255 in size "
        "(comma-separated T)",
    )
    ap.add_argument(
        "--sample",
        action="store_true",
        help="also form P3 = x_hat with z drawn from the posterior (seeded), as the authors do",
    )
    ap.add_argument(
        "--train-on",
        choices=("poisoned", "clean"),
        default="poisoned",
        help="train both stages on the poisoned rows (the defence) or on their clean "
        "originals (a probe: does the purifier pass the poison because it learned it?)",
    )
    stage2_input = ap.add_mutually_exclusive_group()  # what stage 2 reads instead of its rows
    stage2_input.add_argument(
        "--train-noise",
        type=float,
        default=0.0,
        help="train stage 2 to reconstruct its rows from the rows plus Gaussian noise of this "
        "std (in units of 1/255): a denoising stage 2",
    )
    stage2_input.add_argument(
        "--train-adv",
        type=float,
        default=0.0,
        help="train stage 2 on inputs moved within an l_inf ball of this radius (in units "
        "of 1/255) to where its reconstruction errs most: an adversarially trained stage 2",
    )
    stage2_input.add_argument(
        "--jpeg-input",
        type=int,
        default=0,
        help="stage 2 reads the JPEG (this quality) of its rows and reconstructs the rows "
        "themselves; P2 and P3 are formed from the JPEG of their input",
    )
    stage2_input.add_argument(
        "--train-moved",
        metavar="DIR",
        help="train stage 2 reading its rows moved as DIR moves the poisoned rows, the "
        "targets its rows: DIR is the poisoned set attacked once more, e.g. by `raypurify "
        "poison --attack tap --data POISON`, whose surrogate, trained on the poisoned rows, "
        "has learned their shortcut",
    )
    ap.add_argument(
        "--bands", action="store_true", help="also measure JPEG-10 and one pass per frequency band"
    )
    ap.add_argument(
        "--save", help="write each P3 of the training rows here (p3-poisoned-K, p3-clean-K, ...)"
    )
    args = ap.parse_args()
    probe = ip.Probe.load(args)
    cfg, poisoned, train, held = probe.cfg, probe.poisoned, probe.train, probe.held
    rows_used = np.concatenate([train, held])
    x0, xc = poisoned.images[rows_used], probe.originals[rows_used]
    labels, classes = poisoned.labels[rows_used], poisoned.num_classes
    n = len(train)

    start = time.perf_counter()
    inputs = {"poisoned": x0, "clean": xc}
    fit_on = args.train_on  # the rows both stages learn from: the defender's, or (a probe) clean
    stage1 = ip.train_stage(cfg, cfg.stage1, inputs[fit_on][:n], labels[:n], classes)
    p1 = {
        k: ip.to_uint8(ip.apply(stage1, ip.as_input(v), labels, ip.subtract))
        for k, v in inputs.items()
    }
    front = JpegOptions(quality=args.jpeg_input) if args.jpeg_input else None

    def read(x: torch.Tensor) -> torch.Tensor:
        """What stage 2 reads of an input: the input, or with --jpeg-input its JPEG."""
        return x if front is None else ip.as_input(jpeg(ip.to_uint8(x), front))

    stage2_reads, reads = None, "its input"  # what stage 2 trains on, and its description
    if front is not None:
        stage2_reads = jpeg(p1[fit_on][:n], front)
        reads = f"JPEG-{args.jpeg_input} of its input"
    elif args.train_moved:
        moved = ip.by_index(read_images(args.train_moved), poisoned.index[rows_used[:n]])
        step = moved.astype(np.int16) - x0[:n]
        stage2_reads = np.clip(p1[fit_on][:n] + step, 0, 255).astype(np.uint8)
        reads = f"its rows moved as {args.train_moved} moves the poisoned rows, in training"
    noise = args.train_noise / 255
    stage2 = ip.train_stage(
        cfg,
        cfg.stage2,
        p1[fit_on][:n],
        labels[:n],
        classes,
        input_noise=noise,
        input_attack=args.train_adv / 255,
        read=stage2_reads,
    )
    train_s = time.perf_counter() - start
    p2 = {}
    for k, v in p1.items():
        x1 = ip.as_input(v)
        p2[k] = torch.clamp(x1 - ip.apply(stage2, read(x1), labels, ip.perturbation), 0, 1)

    delta = x0.astype(np.float64) - xc
    rows = []

    def measure(name: str, poisoned_out: np.ndarray, clean_out: np.ndarray) -> None:
        for part, sel in (("training rows", slice(0, n)), ("held-out rows", slice(n, None))):
            d, clean_rows = delta[sel], xc[sel].astype(np.float64)
            rows.append(
                {
                    "purifier": name,
                    "rows": part,
                    "kept": share_kept(poisoned_out[sel] - clean_rows, d),
                    "response": share_kept(poisoned_out[sel] - clean_out[sel].astype(float), d),
                    "p3_db": psnr(xc[sel], poisoned_out[sel]),
                    "clean_p3_db": psnr(xc[sel], clean_out[sel]),
                }
            )

    def keep(name: str, tag: str, out: dict[str, torch.Tensor]) -> None:
        """Round `out` (P3 of the poisoned and the clean rows) as the pipeline stores it,
        measure it, and with --save write its training rows as DIR/p3-{poisoned,clean}-TAG."""
        p3 = {which: ip.to_uint8(x) for which, x in out.items()}
        if args.save:
            for which, images in p3.items():
                rows_of = ImageSet(images[:n], labels[:n], poisoned.index[train], poisoned.classes)
                write_images(rows_of, Path(args.save) / f"p3-{which}-{tag}")
        measure(name, p3["poisoned"], p3["clean"])

    quality = JpegOptions()  # the baseline the table compares with, on the same rows
    jpeg_out = {"poisoned": jpeg(x0, quality), "clean": jpeg(xc, quality)}
    measure(f"JPEG-{quality.quality}", jpeg_out["poisoned"], jpeg_out["clean"])
    x_hat = {which: ip.apply(stage2, read(x), labels, ip.reconstruct) for which, x in p2.items()}
    if args.bands:  # on the training rows
        one = {which: ip.to_uint8(x) for which, x in x_hat.items()}
        bands = [
            row
            for name, o in ((f"JPEG-{quality.quality}", jpeg_out), ("D-VAE, 1 pass", one))
            for row in band_rows(name, delta[:n], xc[:n], o["poisoned"][:n], o["clean"][:n])
        ]
    out = x_hat
    for k in range(1, args.passes + 1):
        if k > 1:
            out = {
                which: ip.apply(stage2, read(x), labels, ip.reconstruct) for which, x in out.items()
            }
        keep(f"D-VAE, {k} pass{'es' if k > 1 else ''}", str(k), out)
    if args.shift_average:
        out = {which: phase_average(stage2, read(x), labels) for which, x in p2.items()}
        keep("D-VAE, x_hat averaged over 8 phases and flips", "phases", out)
    latent_maps = [
        *((f"D-VAE, z = mu rounded to {v:g} std", f"q{v:g}", quantized(v)) for v in args.quantize),
        *(
            (f"D-VAE, z = 0 where abs(mu) < {v:g} std", f"dz{v:g}", dead_zoned(v))
            for v in args.dead_zone
        ),
    ]
    for label, tag, z_of in latent_maps:
        fn = from_latent(z_of)
        out = {which: ip.apply(stage2, read(x), labels, fn) for which, x in p2.items()}
        keep(label, tag, out)
    if args.sample:
        draw, out = PosteriorSample(seed=0), {}
        for which, x in p2.items():
            draw.reset()
            out[which] = ip.apply(stage2, read(x), labels, from_latent(draw))
        keep("D-VAE, z drawn from the posterior", "sampled", out)
    for t in args.restore:
        out = {which: restored(x_hat[which], p2[which], t / 255) for which in p2}
        keep(f"D-VAE, x_hat + (x2 - x_hat) where >= {t:g}/255", f"r{t:g}", out)
    for g in args.extrapolate:
        out = {which: (1 + g) * x_hat[which] - g * p2[which] for which in p2}
        keep(f"D-VAE, x_hat + {g:g} (x_hat - x2)", f"x{g:g}", out)
    notes = (
        f"Poison {args.poison}. Both stages of the {args.preset} preset (overrides: "
        f"{args.set or 'none'}; stage 2's input noise std {args.train_noise:g}/255, "
        f"adversarial radius {args.train_adv:g}/255; "
        f"it reads {reads}) "
        f"trained in process on {n} {fit_on} rows in {train_s:.0f} s, "
        f"on {ip.DEV.type}; measured on them and on {len(held)} held-out rows (z = mu where "
        "a row does not say otherwise)."
    )
    columns = ["purifier", "rows", "kept", "response", "p3_db", "clean_p3_db"]
    tag = f"-{args.label}" if args.label else ""
    write_results(f"p3_passes-{Path(args.poison).name}{tag}", rows, columns, notes)
    if args.bands:
        columns = ["purifier", "band", "poison_share", "image_share", "response", "image"]
        name = f"p3_passes-{Path(args.poison).name}{tag}-bands"
        write_results(name, bands, columns, notes + f" Bands on the {n} training rows.")


if __name__ == "__main__":
    main()
