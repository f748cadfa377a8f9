"""The cluster projection of docs/multi_worker.md, computed from measured figures.

    python benchmarks/service_wire.py --grain 20 > wire224.txt
    python benchmarks/service_wire.py --dataset folder:CIFAR10 --size 32 --batch 256 --caps 0 > wire32.txt
    python benchmarks/cluster_table.py --wire-224 wire224.txt --wire-32 wire32.txt

For each model (ResNet-18 at 32 px, ResNet-50 at 224 px) and GPUs per trainer host, with
P = GPUs x pairs/s per GPU:

- input worker cores = P x (CPU ms to make a pair + ms to pack it) / 1000 / busy, per
  `--augment-on` (measured here: `cpu_ms_per_pair` of service_wire.py), where busy is
  the share of its cores tf.data kept busy while making pairs (`cores_busy`; 1 where
  the result has none): cores are provisioned for the wall clock, not the CPU time;
- network into the trainer host = P x bytes per pair on the wire x 8 (measured on the
  trainer's veth: the unlimited rows of service_wire.py), per wire format;
- trainer cores to receive = P x trainer CPU ms per pair / 1000 (measured: the reader's
  CPU time per pair, unlimited rows; jpeg's includes its decode);
- the wire format for each NIC: uint8 where its traffic fits in NIC_SHARE of the NIC,
  else jpeg where that fits, else neither (more NIC, or fewer GPUs per host).

The pairs/s per GPU are not measured here (no GPU): `--gpu-pairs-32` defaults to the
PyTorch reference's ResNet-18 step on one H100 (19,300 pairs/s, measured elsewhere:
../shared/FACTS.md) and `--gpu-pairs-224` to ResNet-50's FLOP-scaled estimate (2,600,
docs/gpu.md). Every figure from service_wire.py is per pair, so it scales to any rate.
Prints markdown tables and one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, positive_int  # noqa: E402

NIC_SHARE = 0.7  # of a NIC's line rate the input may take: gRPC bursts, checkpoints, other traffic
NICS = (10, 25, 100)  # Gbit/s
GPUS = (1, 4, 8)


def _last_json(path: str) -> dict:
    with open(path) as f:
        lines = [line for line in f if line.startswith("{")]
    if not lines:
        raise SystemExit(f"cluster_table: error: {path} holds no JSON line of service_wire.py; run it first")
    return json.loads(lines[-1])


def _figures(wire_json: dict) -> dict:
    """Per augment_on: make ms, and per wire: worker ms, bytes/pair, trainer ms (unlimited rows)."""
    out = {}
    for augment_on, costs in wire_json["cpu_ms_per_pair"].items():
        rows = {r["wire"]: r for r in wire_json["rows"] if r["cap_mbit"] == "unlimited" and r["augment_on"] == augment_on}
        out[augment_on] = {
            "make_ms": costs["make_ms_per_pair"],
            "busy": costs.get("cores_busy", 1.0),
            **{w: {"worker_ms": costs[w]["worker_ms_per_pair"], "bytes": rows[w]["bytes_per_pair"],
                   "trainer_ms": rows[w]["trainer_cpu_ms_per_pair"]} for w in rows},
        }
    return out


def project(figures: dict, pairs_per_gpu: float, gpus: int, augment_on: str) -> dict:
    f = figures[augment_on]
    p = gpus * pairs_per_gpu
    row = {"gpus": gpus, "pairs_per_s": p}
    for w in ("uint8", "jpeg"):
        row[f"worker_cores_{w}"] = p * (f["make_ms"] + f[w]["worker_ms"]) / 1e3 / f["busy"]
        row[f"gbit_{w}"] = p * f[w]["bytes"] * 8 / 1e9
        row[f"trainer_cores_{w}"] = p * f[w]["trainer_ms"] / 1e3
    for nic in NICS:
        budget = NIC_SHARE * nic
        row[f"nic_{nic}"] = "uint8" if row["gbit_uint8"] <= budget else "jpeg" if row["gbit_jpeg"] <= budget else "neither"
    return row


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--wire-224", required=True, help="output of service_wire.py at 224 px (its last JSON line is read)")
    p.add_argument("--wire-32", required=True, help="output of service_wire.py at 32 px")
    p.add_argument("--gpu-pairs-32", type=positive_int, default=19_300, help="ResNet-18 32 px pairs/s per GPU")
    p.add_argument("--gpu-pairs-224", type=positive_int, default=2_600, help="ResNet-50 224 px pairs/s per GPU")
    p.add_argument("--augment-on", default="device", choices=("host", "device"))
    args = p.parse_args(argv)
    models = [("ResNet-18, 32 px", _figures(_last_json(args.wire_32)), args.gpu_pairs_32),
              ("ResNet-50, 224 px", _figures(_last_json(args.wire_224)), args.gpu_pairs_224)]
    rows = []
    print(f"`--augment-on {args.augment_on}`; the input may take {NIC_SHARE:.0%} of a NIC.\n")
    print("| model | GPUs per host | pairs/s | worker cores, uint8 / jpeg | Gbit/s into the host, uint8 / jpeg "
          "| trainer cores to receive, uint8 / jpeg | " + " | ".join(f"{n} Gbit/s NIC" for n in NICS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(NICS))
    for name, figures, rate in models:
        for gpus in GPUS:
            r = project(figures, rate, gpus, args.augment_on)
            r["model"] = name
            rows.append(r)
            print(f"| {name} | {gpus} | {r['pairs_per_s']:,.0f} | {r['worker_cores_uint8']:.0f} / "
                  f"{r['worker_cores_jpeg']:.0f} | {r['gbit_uint8']:.1f} / {r['gbit_jpeg']:.1f} | "
                  f"{r['trainer_cores_uint8']:.1f} / {r['trainer_cores_jpeg']:.1f} | "
                  + " | ".join(r[f"nic_{n}"] for n in NICS) + " |")
    print("\nPer pair, the measured inputs:\n")
    print("| model | make a pair (worker CPU ms) | cores busy | jpeg encode (worker ms) | bytes on the wire, uint8 / jpeg "
          "| trainer CPU ms, uint8 / jpeg |")
    print("|---|---|---|---|---|---|")
    for name, figures, _ in models:
        f = figures[args.augment_on]
        print(f"| {name} | {f['make_ms']:.2f} | {f['busy']:.0%} | {f['jpeg']['worker_ms']:.3f} | {f['uint8']['bytes']:,.0f} / "
              f"{f['jpeg']['bytes']:,.0f} | {f['uint8']['trainer_ms']:.2f} / {f['jpeg']['trainer_ms']:.2f} |")
    print(json.dumps({"benchmark": "cluster_table", "augment_on": args.augment_on, "nic_share": NIC_SHARE,
                      "gpu_pairs": {"resnet18_32": args.gpu_pairs_32, "resnet50_224": args.gpu_pairs_224},
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
