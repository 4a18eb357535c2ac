"""Where each finding is: patch-similarity maps against occlusion maps on synthetic phantoms.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/localisation.py [--n-train 4000] [--epochs 8] [--n-eval 200]
                                            [--mask-weight 1.0] [--threads 2] [--json]

The demo phantoms (plugin/demo/phantom.py, through a simulated site) come with a boolean mask
per present finding, so the maps can be scored against where the finding really is. Two
scores per map, for every present finding of every held-out phantom (the finding is known to
be present; whether the model scores it present is not asked):

- pointing game: the map's peak lies inside the finding's mask, grown by ``--tolerance``
  pixels (default 4 px of 128, half a patch) for masks one or two pixels wide (a catheter);
- IoU of the map's region at half its maximum (``map >= 0.5``, maps are in [0, 1]) with the mask.

Models and maps (all through pacsclip's own code: ``ImageEncoder``, ``TriageModel.probabilities``,
``plugin.triage.patch_maps.finding_map``, and the worker's own occlusion maps,
``TriageModel._occlusion_maps``, squares of 1/7 of the input moved by half a square):

- **patch similarity, ViT**: the demo tower is a CNN with no patch tokens, so this script
  trains a small ViT image tower itself (1 x 128 x 128 input, 16 px patches, an 8 x 8 grid;
  a linear projection of each token into the demo's 128-d joint space; the image embedding is
  the mean of the projected tokens). It learns against the demo bundle's own prompt
  embeddings, which stay fixed: (1) zero-shot loss, the finding's present/absent label against
  ``logit_scale * (cos(image, positive) - cos(image, negative))``; (2) with ``--mask-weight``
  > 0, the same logit per patch token against the phantom's coarse mask on the patch grid (as
  the demo tower's own localisation loss uses the masks). ``--mask-weight 0`` trains on image
  labels only. It is exported to ONNX with ``patch_embeds`` and put in a copy of the demo
  bundle (same prompts, no OOD reference), so the maps come out of the runtime path.
- **occlusion, ViT**: the same ViT, occlusion maps of its zero-shot probabilities.
- **occlusion, demo CNN**: the built-in demo bundle (pacsclip-demo), occlusion maps as the
  worker draws them today.

Training and held-out phantoms come from different random streams (``STREAM_TRAIN``,
``STREAM_EVAL`` of plugin/demo/train.py). Synthetic phantoms: the figures compare methods; they
say nothing clinical. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from scipy import ndimage  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

from plugin.demo import train  # noqa: E402
from plugin.demo.phantom import FINDINGS  # noqa: E402
from plugin.demo.sites import simulate_case  # noqa: E402
from plugin.imaging import model_input  # noqa: E402
from plugin.inference import TriageModel  # noqa: E402
from plugin.models.bundle import load_bundle, read_manifest  # noqa: E402
from plugin.models.bundle_writer import pin_file, write_manifest  # noqa: E402
from plugin.models.importers.open_clip_towers import TimmBlock  # noqa: E402
from plugin.models.registry import DEMO_BUNDLE_DIR  # noqa: E402
from plugin.models.runtime import PromptEmbeddings  # noqa: E402
from plugin.triage import FindingPrompts, peak  # noqa: E402
from plugin.triage.patch_maps import finding_map  # noqa: E402

SIZE = 128
# 16 px patches: an 8 x 8 grid, as coarse relative to the image as ViT-B/16's 14 x 14 at 224
# (CheXzero's ViT-B/32 has 7 x 7), and 4x fewer tokens than 8 px patches, which is what lets
# the training fit in a few minutes on two cores.
PATCH = 16
GRID = SIZE // PATCH
POOL = PATCH // train.MASK_STRIDE  # render_cases' coarse masks (1/8) -> the patch grid
METHODS = ("patch similarity, ViT", "occlusion, ViT", "occlusion, demo CNN")
FloatArray = NDArray[np.float32]


class LocalisationViT(nn.Module):
    """A small ViT whose projected patch tokens average to the image embedding."""

    def __init__(self, width: int, depth: int, heads: int, dim: int) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, width, PATCH, stride=PATCH)
        self.position = nn.Parameter(0.02 * torch.randn(1, GRID * GRID, width))
        # pacsclip's own timm-layout block: plain tensor operations, which export to ONNX.
        self.blocks = nn.ModuleList(TimmBlock(width, heads, 2 * width, 1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patches(pixel_values).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            x = block(x)
        tokens = self.proj(self.norm(x))
        return tokens.mean(dim=1), tokens


class _Exported(nn.Module):
    def __init__(self, vit: LocalisationViT) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, tokens = self.vit(pixel_values)
        return functional.normalize(embeds, dim=-1), tokens


@dataclass(frozen=True)
class TrainReport:
    n_train: int
    epochs: int
    seconds: float
    parameters: int
    final_loss: float
    mask_weight: float


def train_vit(
    args: argparse.Namespace, prompts: Sequence[FindingPrompts], scale: float
) -> tuple[LocalisationViT, TrainReport]:
    """Fit the ViT to the demo's fixed prompt embeddings on freshly rendered phantoms."""
    started = time.perf_counter()
    cases = train.render_cases(
        args.n_train, args.seed, train.STREAM_TRAIN, SIZE, workers=args.threads
    )
    pixels = torch.from_numpy(train.model_inputs(cases.images))
    labels = torch.from_numpy(cases.labels().astype(np.float32))
    n, f = cases.masks.shape[:2]
    on_grid = cases.masks.reshape(n, f, GRID, POOL, GRID, POOL).any(axis=(3, 5))
    masks = torch.from_numpy(on_grid.astype(np.float32)).flatten(2)  # [N, F, P]
    positive = torch.tensor(np.stack([p.positive for p in prompts]), dtype=torch.float32)
    negative = torch.tensor(np.stack([p.negative for p in prompts]), dtype=torch.float32)
    direction = (positive - negative).T  # [D, F]
    # Positive cells are rare (a nodule covers a few of 256): weigh them up, capped.
    cell_rate = masks.mean(dim=(0, 2)).clamp(min=1e-4)
    cell_weight = ((1 - cell_rate) / cell_rate).clamp(max=20.0)[None, :, None]
    torch.manual_seed(args.seed)
    vit = LocalisationViT(args.width, args.depth, args.heads, positive.shape[1])
    optimiser = torch.optim.AdamW(vit.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(pixels) + args.batch - 1) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=steps)
    loss_value = float("nan")
    for _ in range(args.epochs):
        order = torch.randperm(len(pixels))
        for start in range(0, len(pixels), args.batch):
            rows = order[start : start + args.batch]
            embeds, tokens = vit(pixels[rows])
            image_logits = scale * (functional.normalize(embeds, dim=-1) @ direction)
            loss = functional.binary_cross_entropy_with_logits(image_logits, labels[rows])
            if args.mask_weight > 0:
                # [B, P, F] -> [B, F, P]: each token's zero-shot logit against its mask cell.
                cell_logits = scale * (functional.normalize(tokens, dim=-1) @ direction)
                loss = loss + args.mask_weight * functional.binary_cross_entropy_with_logits(
                    cell_logits.transpose(1, 2), masks[rows], pos_weight=cell_weight
                )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_value = loss.item()
    parameters = sum(p.numel() for p in vit.parameters())
    report = TrainReport(
        args.n_train,
        args.epochs,
        time.perf_counter() - started,
        parameters,
        loss_value,
        args.mask_weight,
    )
    return vit.eval(), report


def vit_bundle(vit: LocalisationViT, dest: Path) -> Path:
    """A copy of the demo bundle with the ViT as its image tower (patch_embeds included)."""
    shutil.copytree(DEMO_BUNDLE_DIR, dest)
    tower = dest / train.IMAGE_TOWER_FILE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Exported(vit),
            (torch.zeros(2, 1, SIZE, SIZE),),
            str(tower),
            input_names=["pixel_values"],
            output_names=["image_embeds", "patch_embeds"],
            dynamic_axes={
                n: {0: "batch"} for n in ("pixel_values", "image_embeds", "patch_embeds")
            },
            opset_version=17,
            dynamo=False,
        )
    manifest = read_manifest(dest)
    files = manifest.files.model_copy(
        update={"image_tower": pin_file(dest, train.IMAGE_TOWER_FILE)}
    )
    # The OOD reference was fitted on the CNN's embeddings: it means nothing for this tower.
    (dest / "ood_reference.npz").unlink()
    write_manifest(
        dest,
        manifest.model_copy(
            update={
                "name": "localisation-vit",
                "version": "benchmark",
                "files": files,
                "ood": None,
                "patch_grid": (GRID, GRID),
            }
        ),
    )
    return dest


@dataclass(frozen=True)
class Case:
    display: FloatArray  # [128, 128] in [0, 1]
    masks: dict[str, NDArray[np.bool_]]  # present findings only, full resolution


def held_out_cases(n: int, seed: int) -> list[Case]:
    """Phantoms of the evaluation stream with at least one finding, as render_cases makes them."""
    cases = []
    for index in range(n):
        case = simulate_case(
            np.random.SeedSequence(seed, spawn_key=(train.STREAM_EVAL, index)), size=SIZE
        )
        masks = {k: v for k, v in case.acquisition.masks.items() if v.any()}
        if masks:
            # 8-bit, as the training images (render_cases) are.
            display = np.round(case.acquisition.pixels * 255.0).astype(np.float32) / 255.0
            cases.append(Case(display, masks))
    return cases


MapMaker = Callable[[Case], dict[str, FloatArray]]


def patch_maker(model: TriageModel) -> MapMaker:
    prompts = {p.name: p for p in model.prompts}

    def make(case: Case) -> dict[str, FloatArray]:
        _, patches = model.encoder.encode_with_patches(model_input(case.display, model.spec)[None])
        grid = model.encoder.patch_grid(patches.shape[1])
        return {
            name: finding_map(patches[0], grid, prompts[name], case.display.shape, model.spec)
            for name in case.masks
        }

    return make


def occlusion_maker(model: TriageModel) -> MapMaker:
    column = {name: j for j, name in enumerate(model.finding_names)}

    def make(case: Case) -> dict[str, FloatArray]:
        names = list(case.masks)
        # Exactly the worker's occlusion maps (squares, stride and input-space blanking as
        # TriageModel draws them); one pass serves every finding of the image.
        maps = model._occlusion_maps(case.display, [column[n] for n in names], None)
        return dict(zip(names, maps, strict=True))

    return make


@dataclass(frozen=True)
class MethodScore:
    method: str
    pointing: dict[str, float]  # by finding, and "all"
    iou: dict[str, float]
    n: dict[str, int]
    ms_per_image: float


def score(method: str, make: MapMaker, cases: Sequence[Case], tolerance: int) -> MethodScore:
    hits: dict[str, list[float]] = defaultdict(list)
    ious: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    maps = [make(case) for case in cases]
    elapsed = time.perf_counter() - started
    for case, by_finding in zip(cases, maps, strict=True):
        for name, mask in case.masks.items():
            heat = by_finding[name]
            row, col, _ = peak(heat)
            grown = ndimage.binary_dilation(mask, iterations=tolerance) if tolerance else mask
            region = heat >= 0.5
            union = np.logical_or(region, mask).sum()
            for key in (name, "all"):
                hits[key].append(float(grown[row, col]))
                ious[key].append(float(np.logical_and(region, mask).sum() / union))
    keys = [*[f for f in FINDINGS if f in hits], "all"]
    return MethodScore(
        method,
        {k: float(np.mean(hits[k])) for k in keys},
        {k: float(np.mean(ious[k])) for k in keys},
        {k: len(hits[k]) for k in keys},
        1000.0 * elapsed / len(cases),
    )


def format_table(
    scores: Sequence[MethodScore], report: TrainReport, tolerance: int, n_cases: int
) -> str:
    keys = list(scores[0].pointing)
    lines = [
        f"{n_cases} held-out phantoms (128 x 128) with at least one finding; pointing game "
        f"tolerance {tolerance} px; IoU of map >= 0.5 with the mask",
        f"ViT: {report.parameters:,} parameters, trained here on {report.n_train} phantoms x "
        f"{report.epochs} epochs in {report.seconds:.0f} s (mask weight {report.mask_weight}), "
        f"final loss {report.final_loss:.3f}",
        f"{'method':<24}{'metric':<10}" + "".join(f"{k[:12]:>13}" for k in keys) + f"{'ms/img':>9}",
    ]
    for s in scores:
        lines.append(
            f"{s.method:<24}{'pointing':<10}"
            + "".join(f"{s.pointing[k]:>13.3f}" for k in keys)
            + f"{s.ms_per_image:>9.1f}"
        )
        lines.append(f"{'':<24}{'IoU':<10}" + "".join(f"{s.iou[k]:>13.3f}" for k in keys))
    lines.append(f"{'n findings':<34}" + "".join(f"{scores[0].n[k]:>13d}" for k in keys))
    patch, occ_vit, occ_cnn = scores
    for other in (occ_vit, occ_cnn):
        lines.append(
            f"ratio {patch.method} / {other.method}: pointing "
            f"{_ratio(patch.pointing['all'], other.pointing['all'])}, IoU "
            f"{_ratio(patch.iou['all'], other.iou['all'])}, time "
            f"{_ratio(patch.ms_per_image, other.ms_per_image, 3)}"
        )
    return "\n".join(lines)


def _ratio(a: float, b: float, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if b > 0 else "n/a (0 below)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--n-eval", type=int, default=200, help="phantoms drawn; normal ones skipped"
    )
    parser.add_argument("--mask-weight", type=float, default=1.0)
    parser.add_argument("--tolerance", type=int, default=4, help="pointing-game tolerance in px")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    demo = TriageModel(load_bundle(DEMO_BUNDLE_DIR), threads=args.threads, ood_guard=False)
    stored = PromptEmbeddings.load(demo.bundle)
    prompts = [
        FindingPrompts.from_prompt_sets(name, *stored.for_finding(name)) for name in FINDINGS
    ]
    vit, report = train_vit(args, prompts, demo.logit_scale)
    cases = held_out_cases(args.n_eval, args.seed)
    with tempfile.TemporaryDirectory(prefix="pacsclip-localisation-") as tmp:
        bundle = load_bundle(vit_bundle(vit, Path(tmp) / "vit"))
        vit_model = TriageModel(bundle, threads=args.threads, ood_guard=False)
        makers = (patch_maker(vit_model), occlusion_maker(vit_model), occlusion_maker(demo))
        scores = [
            score(m, make, cases, args.tolerance) for m, make in zip(METHODS, makers, strict=True)
        ]
    if args.json:
        print(
            json.dumps(
                {
                    "train": asdict(report),
                    "tolerance": args.tolerance,
                    "cases": len(cases),
                    "methods": [asdict(s) for s in scores],
                },
                indent=2,
            )
        )
    else:
        print(format_table(scores, report, args.tolerance, len(cases)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
