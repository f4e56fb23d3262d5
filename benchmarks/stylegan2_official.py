"""Our StyleGAN2 against the official implementation (NVlabs/stylegan3, ``--cfg=stylegan2``): images/s
at the same size, capacity and batch, and FID at equal images seen, side by side.

The official code is run as a baseline, never vendored: fetch it into a folder git ignores, apply
the compatibility fixes current PyTorch needs (``distutils.strtobool``, ``pkg_resources.parse_version``,
``Sampler.__init__(dataset)``, using the module ``torch.utils.cpp_extension.load`` returns, and
single-channel PNGs in ``gen_images.py``), then on a GPU machine:

    python benchmarks/stylegan2_official.py --write-pngs /tmp/fm64png   # Fashion-MNIST train at 64 px, our resize
    python dataset_tool.py --source=/tmp/fm64png --dest=/tmp/fm64.zip
    python train.py --outdir=/tmp/sg --cfg=stylegan2 --data=/tmp/fm64.zip --gpus=1 --batch=64 --gamma=0.0128 \\
        --glr=0.0025 --dlr=0.0025 --mirror=0 --aug=noaug --metrics=none --tick=4 --snap=4 --kimg=32 [--cbase=4096]

``--cbase=32768`` (the default) is 512 channels at every resolution up to 64 px, our ``ngf=ndf=512``;
``--cbase=4096`` is 64 channels at 64 px doubling to 512, our ``ngf=ndf=64``. Both sides run the
paper's config F as the official ``--cfg=stylegan2`` sets it: an 8-layer mapping network, style
mixing 0.9, path-length regularisation 2, and the learning rates, R1 gamma and EMA half-life (20
kimg, ramped over 5%) given above. (The Fashion-MNIST recipe, benchmarks/recipes/fmnist-stylegan2.yaml,
has since moved to StyleGAN2-ADA's small-data settings at 32 channels; these comparisons keep
config F.) Our side: ``train_throughput.py --models stylegan2,stylegan2_c512`` and
``time_to_quality.py --recipe benchmarks/recipes/fmnist-stylegan2.yaml --skip-recipe --variants
'ours_c512:ngf=512,ndf=512,mapping_layers=8,style_mixing=0.9,pl_weight=2,ema_kimg=20,ema_rampup=0.05,compile=false,steps=500'
--score-npz official=FILE`` (FID of 10,000 samples of each, one evaluator; the official samples are
seeds 0-9999 computed as its gen_images.py computes them, with truncation 1 and constant noise,
saved as uint8 [N, 64, 64] under the key ``images``).

This script reads what those runs left (the official ``log.txt`` files and our JSON results) and
writes ``benchmarks/results/stylegan2_vs_official_<gpu>.json``:

    python benchmarks/stylegan2_official.py --official-log 32768=FILE --official-log 4096=FILE \\
        [--throughput benchmarks/results/train_throughput_h100-80gb-hbm3.json] [--quality FILE] [--tag h100]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, find_fmnist, load_fmnist, resize_on_device

TICK = re.compile(r"^tick\s+(\d+)\s+kimg\s+([\d.]+).*?sec/kimg\s+([\d.]+)")
OURS = {32768: "stylegan2_c512", 4096: "stylegan2"}  # --cbase -> our family of the same widths


def official_rate(log: Path) -> dict[str, Any]:
    """Median seconds per kimg over the ticks after the first two (start-up, plugin builds, cuDNN tuning)."""
    ticks = [(int(m[1]), float(m[2]), float(m[3])) for m in map(TICK.match, log.read_text().splitlines()) if m]
    steady = [spk for tick, _, spk in ticks if tick >= 2]
    if not steady:
        raise SystemExit(f"{log}: no tick after the first two; run the official code longer (--kimg)")
    spk = statistics.median(steady)
    return {"log": str(log.resolve().relative_to(ROOT)) if log.resolve().is_relative_to(ROOT) else str(log),
            "ticks_used": len(steady), "sec_per_kimg_median": spk, "images_per_s": 1000.0 / spk,
            "kimg_reached": ticks[-1][1]}


def write_pngs(out: Path, data: str | None) -> None:
    """The training split resized to 64 px exactly as our benchmarks resize it, one PNG per image."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    import PIL.Image  # noqa: PLC0415

    d = load_fmnist(find_fmnist(data))
    x = resize_on_device(d["train_x"], 64, "cpu").numpy()[:, 0]
    out.mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        PIL.Image.fromarray(x[i], "L").save(out / f"{i:05d}.png")

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(save, range(len(x))))
    labels = [[f"{i:05d}.png", int(y)] for i, y in enumerate(d["train_y"])]
    (out / "dataset.json").write_text(json.dumps({"labels": labels}))
    print(f"wrote {len(x)} PNGs and dataset.json to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-pngs", metavar="DIR", help="only write the training split as 64 px PNGs (and "
                    "dataset.json with the labels) for the official dataset_tool.py, then exit")
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (with --write-pngs)")
    ap.add_argument("--official-log", action="append", default=[], metavar="CBASE=FILE",
                    help="an official run's log.txt and the --cbase it ran with; repeatable")
    ap.add_argument("--throughput", default=str(RESULTS / "train_throughput_h100-80gb-hbm3.json"),
                    help="our train_throughput.py result on the same kind of GPU")
    ap.add_argument("--quality", default=None, help="a time_to_quality.py result with --score-npz (equal images seen)")
    ap.add_argument("--tag", default="h100-80gb-hbm3", help="suffix of the result file's name")
    ap.add_argument("--note", action="append", default=[], help="a sentence kept with the result; repeatable")
    args = ap.parse_args()
    if args.write_pngs:
        write_pngs(Path(args.write_pngs), args.data)
        return
    if not args.official_log:
        ap.error("--official-log is required (or --write-pngs)")
    ours = json.loads(Path(args.throughput).read_text())
    rows: dict[str, Any] = {}
    for spec in args.official_log:
        cbase, _, file = spec.partition("=")
        off = official_rate(Path(file))
        fam = ours["results"]["batch_64"].get(OURS[int(cbase)], {})
        modes = {m: r["images_per_s"] for m, r in fam.items() if isinstance(r, dict) and "images_per_s" in r}
        best = max(modes.values()) if modes else None
        rows[f"cbase_{cbase}"] = {"official": off, "ours_family": OURS[int(cbase)], "ours_images_per_s": modes,
                                  "ours_fastest_over_official": best / off["images_per_s"] if best else None,
                                  "goal_at_least": 2.0, "met": bool(best and best / off["images_per_s"] >= 2.0)}
    result: dict[str, Any] = {"gpu_of_our_throughput": ours.get("machine", {}).get("gpu"), "batch": 64, "size": 64,
                              "throughput": rows, "notes": args.note}
    if args.quality:
        q = json.loads(Path(args.quality).read_text())
        run = q["engine"][0]
        result["equal_images_seen"] = {
            "file": str(Path(args.quality)), "gpu": q["machine"].get("gpu"), "n_samples": q["n_eval"],
            "ours": {"images_seen": run["curve"][-1]["images_seen"], "fid": run["final_fid"]},
            "official": {k: v for k, v in q.get("external", {}).items()},
        }
    out = RESULTS / f"stylegan2_vs_official_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for k, r in rows.items():
        print(f"{k}: official {r['official']['images_per_s']:.0f} img/s, ours {r['ours_images_per_s']} "
              f"-> x{r['ours_fastest_over_official']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
