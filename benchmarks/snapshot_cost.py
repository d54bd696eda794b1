"""What a peer snapshot of FSDP2 shards costs per step (supervise.snapshot_every, issue 13).

    .venv/bin/python benchmarks/snapshot_cost.py [--ranks 2 --layers 4 --dim 512 --reps 12]

`--ranks` processes on this machine (gloo) shard one Dragonfly (2.4b's ratios, shrunk)
with FSDP2 and train it with AdamW.  Each repetition times one training step (forward,
backward with FSDP2's reduce-scatter, optimizer step) and then one snapshot exactly as a
sharded in-process run takes it: pack the rank's parameter and Adam shards, copy them to
host memory, and swap copies with the buddy rank in one all-to-all
(`shard_state.pack`/`send_to_buddy`).  Steps and snapshots alternate, so drift in
machine load hits both alike.  The figure: median snapshot time / median step time,
the share a step grows by with `snapshot_every: 1` (1/N of it with N).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fm9g.model.args import load_model_config
from fm9g.model.dragonfly import build_model
from fm9g.model.shard_plan import buddy_of, ward_of
from fm9g.model.shard_state import live_pieces, pack, send_to_buddy


def rank_main(rank: int, world: int, port: int, opts: argparse.Namespace, out: mp.Queue) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    heads = opts.dim // 64
    args = load_model_config(
        "2.4b",
        num_layers=opts.layers,
        dim_model=opts.dim,
        num_heads=heads,
        num_kv_heads=heads,
        dim_ff=int(opts.dim * 2.5),
        vocab_size=opts.vocab,
    )
    model = build_model(args, seed=0)
    for layer in model.encoder.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    names = [name for name, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, opts.vocab, (opts.batch, opts.seq), generator=generator)
    targets = torch.roll(ids, -1, dims=1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        optimizer.step()

    buddy, ward = buddy_of(rank, world, 1), ward_of(rank, world, 1)
    assert buddy is not None and ward is not None
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]

    def snapshot() -> int:
        flat = pack(live_pieces(model, optimizer), names)
        kept = flat.to("cpu")  # pack made a fresh tensor: on the CPU it is the host copy
        received = torch.empty(int(sizes[ward]), dtype=flat.dtype)
        send_to_buddy(flat, received, buddy, ward, world).wait()
        return kept.numel() * kept.element_size()

    step()  # Adam's moments exist from here: the snapshot's full size
    dist.all_gather(sizes, torch.tensor([pack(live_pieces(model, optimizer), names).numel()]))
    step_s, snap_s, snap_bytes = [], [], 0
    for _ in range(opts.reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        t1 = time.perf_counter()
        snap_bytes = snapshot()
        dist.barrier()
        t2 = time.perf_counter()
        step_s.append(t1 - t0)
        snap_s.append(t2 - t1)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        out.put((params, snap_bytes, statistics.median(step_s), statistics.median(snap_s)))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512, help="hidden size (heads of 64, ffn 2.5x)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=12)
    opts = parser.parse_args()
    context = mp.get_context("spawn")
    out = context.Queue()
    port = free_port()
    procs = [context.Process(target=rank_main, args=(r, opts.ranks, port, opts, out)) for r in range(opts.ranks)]
    for proc in procs:
        proc.start()
    params, snap_bytes, step_s, snap_s = out.get(timeout=900)
    for proc in procs:
        proc.join()
    print(
        f"{params / 1e6:.1f}M parameters over {opts.ranks} ranks; snapshot {snap_bytes / 2**20:.1f} MiB per rank "
        f"(parameter + 2 Adam moments of its shard)"
    )
    print(f"median step {step_s * 1e3:.1f} ms, median snapshot {snap_s * 1e3:.1f} ms")
    print(f"snapshot / step = {snap_s / step_s:.3f}  (snapshot_every: 1 adds this share to each step)")


if __name__ == "__main__":
    main()
