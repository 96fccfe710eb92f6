"""One rank of a distributed profile of a tiny model; launched by tests/test_distributed.py.

Run under torchrun (or with RANK/WORLD_SIZE/MASTER_* set by hand). Rank 0 writes the merged
profile to --out. --die-rank makes that rank exit abruptly after joining the group (a crashed
node); --bad-data-rank gives that rank out-of-vocabulary tokens (an error raised mid-profile).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tiny.py

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tiny import VOCAB, tiny_model, tiny_windows  # noqa: E402

from mi_opt.distributed import profile_distributed, rank_info  # noqa: E402
from mi_opt.errors import MiOptError  # noqa: E402
from mi_opt.profile.ablation import AblationConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n-shards", type=int, default=None)
    p.add_argument("--die-rank", type=int, default=None)
    p.add_argument("--bad-data-rank", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    torch.set_num_threads(1)
    info = rank_info()
    if args.die_rank is not None:
        dist.init_process_group("gloo")
        if info.rank == args.die_rank:
            os._exit(3)
    windows = tiny_windows(8, 16)
    if info.rank == args.bad_data_rank:
        windows = windows + VOCAB
    config = AblationConfig(unit_kinds=("layer", "attn", "mlp", "head"), batch_size=4)
    try:
        profile = profile_distributed(tiny_model("llama"), windows, config, args.shards, n_shards=args.n_shards,
                                      calibration={"source": "tiny"}, timeout_s=args.timeout, progress=False)
    except MiOptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if profile is not None:
        profile.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
